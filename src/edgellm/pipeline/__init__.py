"""Chaining the course's tools under a device budget (lesson 13): recipes, run, grade."""
