#!/usr/bin/env python3
"""Renders a template to stdout: ${NAME} becomes the environment variable NAME, ${json:PATH} becomes the
contents of the file PATH (itself after ${NAME} substitution) as a JSON string. A missing variable is an error.

    render.py TEMPLATE
"""
import json
import os
import re
import sys

VAR = re.compile(r"\$\{(json:)?([^}]+)\}")


def env(name: str) -> str:
    if name not in os.environ:
        sys.exit(f"render.py: {name} is not set")
    return os.environ[name]


def expand(text: str) -> str:
    def one(m: re.Match) -> str:
        if m.group(1):
            path = re.sub(r"\$(\w+)", lambda v: env(v.group(1)), m.group(2))
            with open(path, encoding="utf-8") as f:
                return json.dumps(f.read())
        return env(m.group(2))

    return VAR.sub(one, text)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        out = expand(f.read())
    if sys.argv[1].endswith(".json"):
        json.loads(out)  # fail here, naming the template, rather than in the consumer
    sys.stdout.write(out)
