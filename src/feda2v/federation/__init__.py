"""Nodes, the server and the engines that run rounds (in-process default)."""
