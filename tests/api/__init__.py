"""Tests of the gRPC API: conversion, status mapping, and server + client end to end."""
