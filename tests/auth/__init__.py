"""Tests of server/peftserve/auth: keys file, hashing, callers."""
