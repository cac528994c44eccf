"""Grid object storage: encrypted, 16-of-20 erasure-coded objects on storage namespaces.

:mod:`threebot.storage.codec` is the pure codec (segments, AEAD, zfec, Merkle trees, manifest,
capabilities); :mod:`threebot.storage.client` is the trio client (placement, namespaces,
parallel transfers, check, repair, rm).
"""
