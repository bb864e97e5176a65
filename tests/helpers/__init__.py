"""What the tests share: starting and configuring servers, clients, process
checks, and the handler modules the servers under test import
(``tests.helpers.services:NAME`` and friends).  Fixtures live in conftest.py."""
