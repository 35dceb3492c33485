"""bench/census: the SASS parser, the loop and pass attribution, the prediction's arithmetic, the
launch constants it reads from the kernels' sources, and its quick run end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `bench` is run from the repository root, not installed
    sys.path.insert(0, ROOT)
from bench.census import analysis, build, calibration, hta_kl, lif, model, sass, source  # noqa: E402,E501
from bench.census.machines import CARDS  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc not installed: the census compiles CUDA with it")

# A hand-written function in nvdisasm -gi -c's layout: a loop whose body has an if/else (the
# else arm is longer and holds the MUFU), a global load of 16 bytes, a call, and an inlined line.
SASS = """
        .section\t.text.kern,"ax",@progbits
.text.kern:
\t//## File "/src/k.cu", line 10
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
\t//## File "/src/k.cu", line 12
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/               @P0 BRA `(.L_x_2) ;
\t//## File "/src/m.h", line 3 inlined at "/src/k.cu", line 13
\t//## File "/src/k.cu", line 13
        /*0030*/                   FADD R5, R5, R4 ;
        /*0040*/                   BRA `(.L_x_3) ;
.L_x_2:
\t//## File "/src/k.cu", line 14
        /*0050*/                   FMUL R5, R5, R4 ;
        /*0060*/                   MUFU.EX2 R5, R5 ;
        /*0070*/                   FADD R5, R5, 1 ;
        /*0078*/              @!P2 LDG.E R7, desc[UR4][R2.64] ;
.L_x_3:
\t//## File "/src/k.cu", line 12
        /*0080*/                   CALL.REL.NOINC `($slow) ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
.L_x_4:
        /*00b0*/                   BRA `(.L_x_4) ;
"""


def test_parse_reads_instructions_labels_and_inlining_chains():
    (function,) = sass.parse(SASS).values()
    assert function.name == "kern"
    assert [i.opcode for i in function.instructions] == [
        "S2R", "LDG.E.128", "BRA", "FADD", "BRA", "FMUL", "MUFU.EX2", "FADD", "LDG.E",
        "CALL.REL.NOINC", "BRA", "EXIT", "BRA"]
    assert function.labels == {".L_x_1": 0x10, ".L_x_2": 0x50, ".L_x_3": 0x80, ".L_x_4": 0xb0}
    fadd = function.instructions[3]
    assert fadd.source == (sass.SourceLine("/src/m.h", 3), sass.SourceLine("/src/k.cu", 13))
    # a line comment applies until the next one
    assert function.instructions[2].source == (sass.SourceLine("/src/k.cu", 12),)
    assert function.instructions[2].branch_target == ".L_x_2"
    assert sass.access_bytes(function.instructions[1]) == 16


def test_loops_take_the_heaviest_arm_once():
    (function,) = sass.parse(SASS).values()
    loops = function.loops()
    # the body 0x10..0x90, and the branch-to-self padding after EXIT
    assert [(lp.start, lp.end) for lp in loops] == [(0x10, 0x90), (0xb0, 0xb0)]
    body = loops[0]
    assert len(body.instructions) == 10  # every instruction from 0x10 to 0x90
    # LDG, @P0 BRA, then the else arm (FMUL, MUFU, FADD, LDG) rather than (FADD, BRA), CALL, BRA
    assert body.path_instructions == 8
    assert body.path_mufu == 1
    # the predicated 4-byte load beside a 16-byte one is an edge fallback: not counted again
    assert body.path_global_bytes == 16
    assert sass.weights(function.instructions[8]) == (1, 0, 4)
    assert sass.weights(function.instructions[8], vector_loop=True) == (1, 0, 0)
    # the FADD reads R4, which the 16-byte load writes: one load in flight when it waits
    assert sass.loads_in_flight(body) == 16


# Two loops: the first issues two 16-byte loads before it reads either (R8..R11 is the second's),
# the second loads an address (R6, R7) and then loads through it, so it waits after 8 bytes.
SASS_IN_FLIGHT = """
        .section\t.text.k2,"ax",@progbits
.text.k2:
.L_x_1:
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/               @P0 LDG.E.128 R8, desc[UR4][R12.64] ;
        /*0020*/                   IADD3 R2, P1, R2, 0x10, RZ ;
        /*0030*/                   FADD R20, R11, R4 ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   LDG.E.64 R6, desc[UR4][R2.64] ;
        /*0060*/                   LDG.E R9, desc[UR4][R6.64] ;
        /*0070*/                   FADD R20, R20, R9 ;
        /*0080*/               @P1 BRA `(.L_x_2) ;
        /*0090*/                   EXIT ;
"""


def test_loads_in_flight_stop_at_the_first_use_of_a_loaded_register():
    (function,) = sass.parse(SASS_IN_FLIGHT).values()
    both, chained = function.loops()
    assert sass.loads_in_flight(both) == 32
    assert sass.loads_in_flight(chained) == 8


def _body(*lines: str) -> list[sass.Instruction]:
    """Instructions from SASS text lines (addresses in order)."""
    text = ".text.kern:\n" + "".join(f"        /*{16 * n:04x}*/ {line} ;\n"
                                     for n, line in enumerate(lines))
    (function,) = sass.parse(text).values()
    return function.instructions


def test_a_load_used_right_away_has_its_own_bytes_in_flight():
    body = _body("LDG.E.128 R4, desc[UR4][R2.64]", "FADD R8, R4, R8",
                 "LDG.E.128 R4, desc[UR4][R12.64]", "FADD R9, R7, R9")
    # each 16-byte load waited for before the next is issued
    assert sass.load_waits(body) == (32, 2)


def test_loads_issued_before_the_first_use_arrive_together():
    body = _body("LDG.E.128 R4, desc[UR4][R2.64]", "LDG.E.128 R8, desc[UR4][R12.64]",
                 "LDG.E.64 R20, desc[UR4][R14.64]", "FADD R30, R11, R30",  # R8..R11: a use
                 "FADD R31, R4, R21", "@P0 BRA `(.L_x_9)", "FADD R31, R31, R4")
    # one wait for 40 bytes: the loads issued together return together, and a branch does not
    # end the run
    assert sass.load_waits(body) == (40, 1)


def test_overwriting_a_pending_register_waits_and_a_store_reads_all_its_data():
    overwrite = _body("LDG.E R4, desc[UR4][R2.64]", "MOV R4, RZ", "LDG.E R5, desc[UR4][R2.64]",
                      "IADD3 R5, R5, 1, RZ")
    assert sass.load_waits(overwrite) == (8, 2)  # the MOV waits for R4 as the IADD3 for R5
    store = _body("LDG.E R7, desc[UR4][R2.64]", "STG.E.128 desc[UR4][R12.64], R4")
    assert sass.load_waits(store) == (4, 1)  # the 16-byte store reads R4..R7


def test_loads_for_the_next_iteration_are_waited_for_there():
    # software pipelined: the load of the next step is issued before this step's use of the
    # previous one, through a register copy
    body = _body("MOV R8, R4", "LDG.E.128 R4, desc[UR4][R2.64]", "FADD R9, R8, R9",
                 "FADD R9, R9, R10")
    # the MOV of the next iteration waits for the load: one wait per iteration
    assert sass.load_waits(body) == (16, 1)


def test_absent_loads_put_nothing_in_flight():
    body = _body("@P1 LDG.E.128 R8, desc[UR4][R12.64]", "LDG.E.128 R4, desc[UR4][R2.64]",
                 "@P1 FADD R20, R8, R20", "FADD R21, R4, R21")
    assert sass.load_waits(body) == (32, 1)
    optional = body[0]
    assert sass.load_waits(body, absent=lambda ins: ins is optional) == (16, 1)


def test_resource_usage_report():
    report = """
 Function _Z4kernPf:
  REG:40 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5otherv:
  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:352 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = sass.resource_usage(report)
    assert usage["_Z4kernPf"]["REG"] == 40 and usage["_Z4kernPf"]["SHARED"] == 1024
    assert usage["_Z5otherv"]["REG"] == 12


def test_source_loops_of_cpp_and_python(tmp_path):
    cpp = tmp_path / "k.cu"
    cpp.write_text("void f() {\n  for (int i = 0; i < n; ++i) {\n    // } not a brace\n"
                   "    while (x) y();\n  }\n}\n")
    loops = source.cpp_loops(str(cpp))
    assert [(sl.header_line, sl.end_line) for sl in loops] == [(2, 5), (4, 4)]
    py = tmp_path / "k.py"
    py.write_text("def k():\n    for t in range(steps):\n        a = 1\n\n        b = 2\n    c = 3\n")
    (loop,) = source.python_loops(str(py))
    assert (loop.header_line, loop.end_line, loop.header) == (2, 5, "for t in range(steps)")


KERNEL = r"""
__global__ void two_passes(const float* __restrict__ x, float* __restrict__ y, int n,
                           int steps) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float total = 0.f;
  // Pass A: sum of exponentials over the steps.
#pragma unroll 1
  for (int t = 0; t < steps; ++t) {
    total += __expf(x[t * n + i]);
  }
  // Pass B: scale every step.
#pragma unroll 1
  for (int t = 0; t < steps; ++t) {
    y[t * n + i] = x[t * n + i] / total;
  }
}
"""


@pytest.fixture(scope="module")
def compiled_kernel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("census_kernel")
    path = str(folder / "two_passes.cu")
    with open(path, "w") as handle:
        handle.write(KERNEL)
    cubin = str(folder / "two_passes.cubin")
    subprocess.run(build.nvcc_command(path, cubin, str(folder)), check=True, capture_output=True)
    return path, cubin


def _sass_dump(cubin: str) -> list[tuple[int, str]]:
    """(address, instruction) from cuobjdump -sass: a second reading of the same code."""
    text = subprocess.run([sass.tool("cuobjdump"), "-sass", cubin], capture_output=True,
                          text=True, check=True).stdout
    return [(int(a, 16), body.strip()) for a, body in
            re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", text)]


@needs_nvcc
def test_compiled_kernel_counts_match_its_sass(compiled_kernel):
    path, cubin = compiled_kernel
    (function,) = sass.disassemble(cubin).values()
    dump = _sass_dump(cubin)
    assert [i.address for i in function.instructions] == [a for a, _ in dump]
    assert [i.opcode for i in function.instructions] == [b.split()[0] if not b.startswith("@")
                                                         else b.split()[1] for _, b in dump]
    assert function.registers > 0
    anchors = [("A", r"// Pass A"), ("B", r"// Pass B")]
    regions = source.anchor_lines(path, anchors)
    loops = [lp for lp in function.loops() if len(lp.instructions) > 1]
    by_pass = {source.loop_pass(lp, path, regions): lp for lp in loops}
    assert set(by_pass) == {"A", "B"}
    for name, loop in by_pass.items():
        # what the parser counted on the loop's path is what the dump holds in its range
        in_range = [b for a, b in dump if loop.start <= a <= loop.end]
        assert len(loop.instructions) == len(in_range)
        mufu = sum("MUFU" in b for b in in_range)
        assert loop.path_mufu == mufu
        assert loop.path_instructions <= len(in_range)
    assert by_pass["A"].path_mufu >= 1  # __expf: MUFU.EX2
    assert any(i.base == "STG" for i in by_pass["B"].instructions)
    assert not any(i.base == "STG" for i in by_pass["A"].instructions)
    # per-element counts: each loop iteration is one step of one element
    counts = analysis.count(function, path, anchors, lambda loop: 1.0)
    per_pass = {p.name: p for p in counts.passes}
    assert per_pass["A"].instructions == by_pass["A"].path_instructions
    assert per_pass["B"].mufu == by_pass["B"].path_mufu
    assert per_pass["B"].global_bytes == by_pass["B"].path_global_bytes == 8  # load x, store y
    assert counts.unmatched_loops == 0


def test_occupancy_limits():
    card = CARDS["H100"]
    # registers: 64 per thread, 256 threads -> 8 warps of 2048 registers -> 4 blocks
    assert model.blocks_per_sm(card, 256, 64, 0) == 4
    # threads: 1024-thread blocks, few registers -> 2 blocks
    assert model.blocks_per_sm(card, 1024, 16, 0) == 2
    # shared memory: 100 KiB + 1 KiB reserved per block -> 2 blocks of 228 KiB
    assert model.blocks_per_sm(card, 128, 32, 100 * 1024) == 2
    # registers round up to 256 per warp: 33 registers cost what 40 do
    assert model.blocks_per_sm(card, 256, 33, 0) == model.blocks_per_sm(card, 256, 40, 0)


def _launch(**changes):
    values = dict(name="k", blocks=132 * 8, threads=256, registers=32, shared_bytes=0,
                  dram_bytes=3e9, instructions=0.0, mufu=0.0, inflight_bytes_per_thread=64)
    values.update(changes)
    return model.Launch(**values)


def test_time_is_the_largest_term_plus_the_overlap_loss():
    card = CARDS["H100"]
    dram_only = model.time_launch(card, _launch())
    assert dram_only.bound_by == "dram"
    assert dram_only.dram_s == pytest.approx(3e9 / card.copy_bandwidth)
    assert dram_only.kernel_s == pytest.approx(card.launch_s + dram_only.dram_s)
    # issue time: thread instructions over 4 warp instructions per SM and clock
    both = model.time_launch(card, _launch(instructions=card.issue_rate * 2 * dram_only.dram_s))
    assert both.bound_by == "issue"
    assert both.issue_s == pytest.approx(2 * dram_only.dram_s)
    assert both.kernel_s == pytest.approx(card.launch_s + both.issue_s
                                          + model.OVERLAP_LOSS * both.dram_s)
    roofline = model.time_launch(card, _launch(instructions=card.issue_rate * 2 * both.dram_s),
                                 overlap_loss=0.0)
    assert roofline.kernel_s == pytest.approx(card.launch_s + roofline.issue_s)


def test_few_blocks_are_latency_bound_and_issue_on_their_sms_only():
    card = CARDS["H100"]
    few = model.time_launch(card, _launch(blocks=8, threads=512, dram_bytes=6e6,
                                          inflight_bytes_per_thread=16))
    # 8 blocks x 512 threads x 16 bytes in flight per DRAM latency
    expected_bandwidth = 8 * 512 * 16 / model.DRAM_LATENCY_S
    assert few.bound_by == "latency"
    assert few.dram_bandwidth == pytest.approx(expected_bandwidth)
    assert few.active_sms == 8
    issue = model.time_launch(card, _launch(blocks=8, threads=512, dram_bytes=0,
                                            instructions=1e9))
    assert issue.issue_s == pytest.approx(1e9 / (card.issue_rate * 8 / card.sms))


def test_few_warps_issue_at_their_share_of_the_clocks():
    card = CARDS["H100"]
    # 64 registers: 4 blocks of 8 warps per SM, 8 warps per scheduler; a warp that issues every
    # 16 cycles keeps its scheduler busy every other clock, one that issues every 8 all the time
    ideal = model.time_launch(card, _launch(dram_bytes=0, instructions=1e9))
    slow = model.time_launch(card, _launch(dram_bytes=0, instructions=1e9, registers=64,
                                           warp_issue_interval=16))
    assert slow.occupancy_blocks == 4
    assert slow.issue_s == pytest.approx(ideal.issue_s * 2)
    enough = model.time_launch(card, _launch(dram_bytes=0, instructions=1e9, registers=64,
                                             warp_issue_interval=8))
    assert enough.issue_s == pytest.approx(ideal.issue_s)


def test_call_time_and_fraction():
    card = CARDS["H200"]
    assert model.call_time(10e-6, 30e-6) == 30e-6
    assert model.call_time(50e-6, 30e-6) == 50e-6
    assert model.fraction_of_copy(card.copy_bandwidth * 1e-3, 2e-3, card) == pytest.approx(0.5)


def test_byte_models():
    # SPEC 4: 3 E b (2-D), (2T + 1) E b ([T, R, C]); LIF 4 E b plus the re-read of x
    assert hta_kl.model_bytes("bfloat16", 0, 8, 1000) == 3 * 8000 * 2
    assert hta_kl.model_bytes("float32", 4, 8, 1000) == 9 * 8000 * 4
    assert lif.model_bytes("float32", 8, 1024) == 5 * 8 * 1024 * 4


def test_triton_split_mirrors_the_launcher():
    """The census splits few long rows over as many programs as launch_hta_kl does."""
    pytest.importorskip("triton")
    from htakl_kernels.triton_kernels import hta_kl as kernels

    for rows, classes, chunk, sms in ((8, 131072, 4096, 132), (1, 262141, 4096, 132),
                                      (100, 40000, 4096, 132), (3, 5000, 2048, 78),
                                      (132, 131072, 4096, 132)):
        wanted = kernels.split_segments(rows, classes, chunk, sms)
        wanted = -(-classes // kernels.segment_length(classes, wanted, chunk))
        assert hta_kl.split_segments(rows, classes, chunk, sms) == wanted
    assert hta_kl.split_segments(8, 131072, 4096, 132) == 32
    assert hta_kl.split_segments(132, 131072, 4096, 132) == 1


def test_launch_constants_are_read_from_the_sources():
    lif_text = open(os.path.join(ROOT, "csrc", "cuda", "lif_cuda_kernels.cuh")).read()
    assert lif.cuda_constant(lif_text, "kThreads") == int(
        re.search(r"constexpr int kThreads = (\d+);", lif_text).group(1))
    with pytest.raises(ValueError, match="kThreads"):
        lif.cuda_constant(lif_text.replace("kThreads", "kThreadsPerBlock"), "kThreads")
    hta_text = open(os.path.join(ROOT, "csrc", "cuda", "hta_kl_cuda_kernels.cuh")).read()
    constants = hta_kl.cuda_constants(hta_text)
    assert constants["kMaxThreads"] == int(
        re.search(r"constexpr int kMaxThreads = (\d+);", hta_text).group(1))
    # a launcher whose choice of threads changes without the census fails the census
    changed = hta_text.replace("chunks >= kMaxThreads ? kMaxThreads", "chunks > kMaxThreads ? 256")
    with pytest.raises(ValueError, match="launcher changed"):
        hta_kl.cuda_constants(changed)


@needs_nvcc
def test_cuda_row_cache_only_where_it_leaves_two_blocks_per_sm():
    """The census's mirror of the launcher: a bfloat16 row of 32000 classes (128 KB) fits shared
    memory but would leave one block per SM, so it is re-read through L2; a short row is held;
    a prob_mean row is held where the kernel's registers allow one block per SM anyway."""
    kernels = hta_kl.CudaKernels(ROOT)
    card = CARDS["H200"]

    def held(dtype, steps, classes):
        function, _, threads, shared, cached, _ = kernels.launch(card, dtype, steps, 4096, classes)
        return cached, model.blocks_per_sm(card, threads, function.registers, shared)

    assert held("bfloat16", 0, 32000) == (False, 2)
    assert held("bfloat16", 0, 1000)[0]
    assert held("float32", 4, 8000) == (True, 1)


def test_bytes_per_round_trip_is_over_the_passes_that_wait_on_loads():
    passes = [analysis.PassCount("a", global_bytes=32.0, round_trips=1.0),
              analysis.PassCount("b", global_bytes=16.0, round_trips=2.0),
              analysis.PassCount("per-row", global_bytes=5.0)]  # no loop waits: left out
    assert analysis.bytes_per_round_trip(passes) == pytest.approx(48.0 / 3.0)
    assert analysis.bytes_per_round_trip(passes[2:]) == 0.0


def test_triton_launches_read_their_loads_in_flight_and_issue_interval():
    """A chunked Triton row (one program per row, or the split kernel's phases) has the bytes in
    flight its SASS loops show and TritonKernels.warp_issue_interval; a row held on chip, loaded
    outside any loop, has a thread's chunk of it."""
    pytest.importorskip("triton")
    kernels = hta_kl.TritonKernels(ROOT)
    card = CARDS["H200"]
    for steps, rows, classes in ((0, 4096, 32000), (4, 8, 131072)):
        pairs = hta_kl.launches(card, kernels, "float32", steps, rows, classes)
        assert len(pairs) == (1 if rows > card.sms else len(hta_kl.SPLIT_PHASES))
        for launch, counts in pairs:
            expected = analysis.bytes_per_round_trip(counts.passes)
            assert expected > 0
            assert launch.inflight_bytes_per_thread == pytest.approx(expected)
            assert launch.warp_issue_interval == kernels.warp_issue_interval
    _, counts, threads, _, on_chip, inflight = kernels.launch(card, "float32", 0, 4096, 1000)
    assert on_chip and analysis.bytes_per_round_trip(counts.passes) == 0.0
    assert inflight == 1024 // threads * 4


def test_pass_anchors_still_match_the_kernels():
    source.anchor_lines(os.path.join(ROOT, "csrc", "cuda", "hta_kl_cuda_kernels.cuh"),
                        hta_kl.CUDA_ANCHORS)
    source.anchor_lines(os.path.join(ROOT, "triton_kernels", "hta_kl.py"), hta_kl.TRITON_ANCHORS)
    with pytest.raises(ValueError, match="not found"):
        source.anchor_lines(os.path.join(ROOT, "csrc", "cuda", "lif_cuda_kernels.cuh"),
                            [("gone", r"no such line in the kernel")])


def test_calibration_reads_the_measured_table():
    rows = calibration.measured_rows(os.path.join(ROOT, calibration.MEASURED))
    assert len(rows) == 16
    first = next(r for r in rows if r["backend"] == "cuda" and r["steps"] == 4
                 and r["dtype"] == "float32")
    assert first["measured_percent"] == 36


@needs_nvcc
def test_quick_census_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.census", "--quick", "--out",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "census-quick.json").read_text())
    keys = {"backend", "kernel", "dtype", "steps", "neurons", "card", "predicted_fraction",
            "bound_by"}
    assert records and all(keys <= set(r) for r in records)
    assert {r["backend"] for r in records} == {"cuda", "triton"}
    for r in records:
        assert 0 < r["predicted_fraction"] <= 1
        assert r["instructions_per_element"] > 0 and r["mufu_per_element"] > 0
        assert r["dram_bytes"] >= r["model_bytes"]  # the kernels move at least what they must
    assert "| shape | dtype | passes |" in (tmp_path / "census-quick.md").read_text()


@pytest.mark.parametrize("option, value", [("--kernels", "lif,softmax"), ("--backends", "cpu")])
def test_an_unknown_kernel_or_backend_is_named_in_the_error(option, value, tmp_path, capsys):
    from bench.census.__main__ import main
    with pytest.raises(SystemExit):
        main([option, value, "--out", str(tmp_path)])
    assert option in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing compiled or written


def test_compare_joins_measured_cases_with_predictions():
    from bench.census import compare

    census = [{"backend": "cuda", "kernel": "lif", "dtype": "float32", "card": "H100",
               "steps": 8, "neurons": 1024, "predicted_call_fraction": 0.5,
               "predicted_fraction": 0.6, "predicted_call_time_s": 1e-4, "call_bound_by": "dram"}]
    run = {"suite": "lif", "device": {"description": "NVIDIA H100 80GB HBM3"}, "rows": [
        {"implementation": "htakl cuda", "status": "ok", "dtype": "float32", "case": "T8xN1024",
         "dims": {"steps": 8, "neurons": 1024}, "fraction_of_copy_bandwidth": 0.4,
         "device_fraction_of_copy_bandwidth": 0.45, "forward_backward": {"median_s": 2e-4}},
        {"implementation": "htakl cuda", "status": "ok", "dtype": "bfloat16", "case": "T8xN1024",
         "dims": {"steps": 8, "neurons": 1024}, "fraction_of_copy_bandwidth": 0.2,
         "forward_backward": {"median_s": 2e-4}},
        {"implementation": "reference loop (eager)", "status": "ok", "dtype": "float32",
         "case": "T8xN1024", "dims": {"steps": 8, "neurons": 1024},
         "fraction_of_copy_bandwidth": 0.1, "forward_backward": {"median_s": 1e-3}},
    ]}
    rows = compare.join([run], census)
    assert len(rows) == 2  # the baseline is not ours
    assert rows[0]["measured_over_predicted"] == pytest.approx(0.8)
    assert rows[0]["device_over_predicted"] == pytest.approx(0.75)  # GPU time against the kernels
    assert "predicted_fraction" not in rows[1]  # no census record for bfloat16
    table = compare.markdown(rows)
    assert "no census record" in table and "| 40 (45) |" in table and "0.80 (0.75)" in table
