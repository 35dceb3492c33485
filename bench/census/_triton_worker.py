"""Subprocess of census/build.py: compile one source tree's Triton kernels for sm_90 through the
AOT harness of this checkout (triton_kernels/aot.py, lif_aot.py, hta_kl_aot.py), write the cubins
and an index.json of their launch parameters.

The given tree is imported under the name it is installed as (htakl_kernels, with its
triton_kernels folder inside, as setup.py's package_dir maps it) through a folder of symbolic
links, so an older tree's kernels compile with the current harness. A subprocess, because the
kernels register their torch ops on import, once per process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# What the census compiles: the dtypes, and the HTA-KL layouts the benchmark shapes launch.
DTYPES = ("float32", "bfloat16")
# 0: a 2-D student (its own variant where the harness has one: two_d), T = 1: [1, R, C]
HTA_KL_STEPS = (0, 1, 4, 8)
HTA_KL_ON_CHIP_CLASSES = (1000,)  # on-chip rows among the benchmark shapes
HTA_KL_CHUNKED_CLASSES = 32000  # the chunked ones (32000, 131072, 262144) align alike


def package_view(source_root: str, folder: str, harness: str) -> str:
    """`folder`/htakl_kernels: links to source_root's package files, and a triton_kernels folder
    of links to its Triton kernels and to the AOT harness files (*aot.py) in `harness`."""
    package = os.path.join(folder, "htakl_kernels")
    os.makedirs(os.path.join(package, "triton_kernels"))
    for name in os.listdir(os.path.join(source_root, "htakl_kernels")):
        if name in ("triton_kernels", "__pycache__") or name.startswith("_C"):
            continue  # no compiled extension: the Triton kernels do not need it
        os.symlink(os.path.join(source_root, "htakl_kernels", name), os.path.join(package, name))
    kernels = os.path.join(source_root, "triton_kernels")
    names = {n for n in os.listdir(kernels) if n.endswith(".py") and not n.endswith("aot.py")}
    for name in sorted(names | {n for n in os.listdir(harness) if n.endswith("aot.py")}):
        origin = kernels if name in names else harness
        os.symlink(os.path.join(origin, name), os.path.join(package, "triton_kernels", name))
    return folder


class _NoExtension:
    """Meta-path finder refusing htakl_kernels._C: the editable install maps that name to this
    checkout's build, whose op schemas may differ from an older tree's."""

    def find_spec(self, name, path=None, target=None):
        if name == "htakl_kernels._C":
            raise ImportError("the census compiles Triton kernels without the C++ extension")
        return None


def _save(out: str, name: str, compiled, **launch) -> dict:
    path = os.path.join(out, f"{name}.cubin")
    with open(path, "wb") as handle:
        handle.write(compiled.asm["cubin"])
    return {"cubin": path, "num_warps": compiled.metadata.num_warps,
            "shared": compiled.metadata.shared, **launch}


def compile_lif(out: str) -> dict:
    import torch
    from htakl_kernels.triton_kernels import lif, lif_aot

    index = {}
    for dtype in DTYPES:
        # neurons per program: block_of(dtype), or the one BLOCK of kernels older than it
        block = lif.block_of(getattr(torch, dtype)) if hasattr(lif, "block_of") else lif.BLOCK
        forward, backward = lif_aot.compile_variants(dtype)
        for direction, compiled in (("forward", forward), ("backward", backward)):
            index[f"lif-{direction}-{dtype}"] = _save(out, f"lif-{direction}-{dtype}", compiled,
                                                      block=block)
        # a backward that holds H `segment` steps at a time: one kernel per segment length
        for segment in getattr(lif, "SEGMENTS", ()):
            name = f"lif-backward-{dtype}-segment{segment}"
            _, backward = lif_aot.compile_variants(dtype, segment=segment)
            index[name] = _save(out, name, backward, block=block, segment=segment)
    return index


def compile_hta_kl(out: str) -> dict:
    import inspect

    import triton

    from htakl_kernels.triton_kernels import hta_kl, hta_kl_aot

    harness_options = inspect.signature(hta_kl_aot.compile_variant).parameters
    index = {}
    for dtype in DTYPES:
        on_chip_limit, chunk = hta_kl.default_layout(False)
        # (on chip, block, classes): the chunked benchmark rows are all multiples of 16 classes
        layouts = [(True, triton.next_power_of_2(c), c) for c in HTA_KL_ON_CHIP_CLASSES
                   if c <= on_chip_limit] + [(False, chunk, HTA_KL_CHUNKED_CLASSES)]
        for on_chip, block, classes in layouts:
            align = math.gcd(classes, 16)
            for steps in HTA_KL_STEPS:
                options = {}
                if steps == 0:
                    if "two_d" not in harness_options:
                        continue  # a harness without it: a 2-D student runs the T = 1 kernel
                    options["two_d"] = True
                if "classes" in harness_options:  # rows aligned as `classes`' are (ALIGN)
                    options["classes"] = classes
                name = f"hta_kl-{dtype}-{'onchip' if on_chip else 'chunked'}{block}-T{steps}"
                compiled = hta_kl_aot.compile_variant(
                    dtype, on_chip=on_chip, block=block, prob_mean=steps > 1,
                    steps_pad=triton.next_power_of_2(max(steps, 1)), **options)
                radix_block = getattr(hta_kl, "RADIX_BLOCK", None)
                launch = dict(block=block, on_chip=on_chip, steps=steps,
                              on_chip_limit=on_chip_limit,
                              align=align if "classes" in harness_options else None,
                              radix_block=min(radix_block, block) if radix_block else None,
                              radix_bits=getattr(hta_kl, "RADIX_BITS", None))
                index[name] = _save(out, name, compiled, **launch)
                # The split kernel's phases, for few long rows (where the harness has them).
                for phase in getattr(hta_kl_aot, "SPLIT_PHASES", ()) if not on_chip else ():
                    split_name = f"{name}-split{phase}"
                    compiled = hta_kl_aot.compile_split_variant(
                        dtype, phase=phase, block=block, prob_mean=steps > 1,
                        steps_pad=triton.next_power_of_2(max(steps, 1)), **options)
                    index[split_name] = _save(out, split_name, compiled, phase=phase, **launch)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--family", choices=("lif", "hta_kl"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--harness", default=os.path.join(REPO, "triton_kernels"),
                        help="folder of the AOT harness (aot.py, lif_aot.py, hta_kl_aot.py)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as view:
        sys.path.insert(0, package_view(os.path.abspath(args.source), view,
                                        os.path.abspath(args.harness)))
        sys.meta_path.insert(0, _NoExtension())
        index = compile_lif(args.out) if args.family == "lif" else compile_hta_kl(args.out)
    with open(os.path.join(args.out, "index.json"), "w") as handle:
        json.dump(index, handle, indent=1)


if __name__ == "__main__":
    main()
