"""Build of the one C extension; all project metadata stays in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "threebot.storage._gf",
            sources=["threebot/storage/_gf.c"],
            extra_compile_args=["-O3"],
        )
    ]
)
