"""Registries of named classes (strategies, pseudo-label policies, oracles, trainers): plain dicts
filled by a class decorator, so constants pick a class by name and the loop never branches on it."""

from __future__ import annotations


def registrar(registry: dict):
    """`register = registrar(REGISTRY)`; then `@register("name")` stores the class under `name` and sets
    `cls.name`."""

    def register(name: str):
        def deco(cls):
            cls.name = name
            registry[name] = cls
            return cls

        return deco

    return register
