"""Tests of the client SDK that need no server."""
