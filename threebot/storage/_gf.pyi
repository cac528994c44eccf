from collections.abc import Sequence

from typing_extensions import Buffer

def combine(
    coefs: Buffer,
    inputs: Sequence[Buffer],
    outputs: Sequence[Buffer],
    *,
    impl: str | None = None,
) -> None: ...
def implementations() -> tuple[str, ...]: ...
