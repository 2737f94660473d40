"""Bulk tensors on the wire: a msgpack map name -> {dtype, shape, data} of raw little-endian buffers.

DESIGN.md allows msgpack for exactly this (trajectory batches, policy weights), in a frame after a
leyline header that names and versions it. Nothing is pickled: decoding accepts only the dtypes below
and a buffer whose length matches its shape, so a malformed frame is a ValueError, never code.
"""

from __future__ import annotations

import math
import reprlib

import msgpack
import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "bool": torch.bool,
          "uint8": torch.uint8}


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return msgpack.packb({
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
               "data": t.detach().cpu().contiguous().numpy().tobytes()}
        for name, t in tensors.items()}, use_bin_type=True)


def unpack(payload: bytes) -> dict[str, torch.Tensor]:
    """The inverse of pack; ValueError on anything else, the only error its callers catch (a TypeError killed
    simic_learner). Hence exact types: msgpack's true is a bool, which isinstance(d, int) accepts. Messages
    echo what the sender chose through reprlib.repr only: the learner keeps each refusal's reason in its
    checkpoint (60 trajectories with 1 MiB tensor names had made 60 MiB of reasons)."""
    try:
        items = msgpack.unpackb(payload, raw=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"not a msgpack tensor map: {exc}") from None
    if not isinstance(items, dict):
        raise ValueError("not a msgpack tensor map")
    tensors = {}
    for name, item in items.items():
        if not (isinstance(name, str) and isinstance(item, dict) and isinstance(item.get("dtype"), str)
                and item["dtype"] in DTYPES and isinstance(item.get("data"), bytes)
                and isinstance(item.get("shape"), list) and all(type(d) is int and d >= 0 for d in item["shape"])):
            raise ValueError(f"tensor {reprlib.repr(name)}: needs a str name, dtype in {sorted(DTYPES)}, shape and "
                             "data")
        dtype = np.dtype(item["dtype"]).newbyteorder("<")
        if len(item["data"]) != math.prod(item["shape"]) * dtype.itemsize:
            raise ValueError(f"tensor {reprlib.repr(name)}: {len(item['data'])} bytes for shape "
                             f"{reprlib.repr(item['shape'])}")
        array = np.frombuffer(item["data"], dtype=dtype).reshape(item["shape"])
        tensors[name] = torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
    return tensors
