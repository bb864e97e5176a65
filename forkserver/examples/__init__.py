"""Example services: the echo server and a tiny HTTP/1.0 responder."""
