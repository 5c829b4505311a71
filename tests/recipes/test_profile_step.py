"""`recipes/profile_step.py` at CPU size: the trainer's step profiled, its time split into categories that add up,
MoE work (routing, permutation) found in an MoE model and absent from a dense one; and the name rules of
`muon_recipes/train/profiling.py` on kernel names as a GPU trace spells them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from muon_recipes.train.profiling import CATEGORIES, categorize

ROOT = Path(__file__).resolve().parents[2]
TINY = ["device=cpu", "train.compile=false", "train.seq_len=64", "train.batch_size=4", "train.global_batch_tokens=256",
        "logging.wandb.mode=disabled"]


def profile(tmp_path: Path, model: str) -> tuple[dict, str]:
    out = tmp_path / model
    command = [sys.executable, "recipes/profile_step.py", f"model={model}", *TINY, "--warmup", "1", "--steps", "1",
               "--json", f"{out}.json", "--markdown", f"{out}.md"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(f"{out}.json").read_text()), Path(f"{out}.md").read_text()


def test_profile_of_an_moe_step_adds_up_and_finds_the_moe_work(tmp_path):
    report, markdown = profile(tmp_path, "moe_tiny")
    step = report["profile"]
    assert set(step["categories"]) == set(CATEGORIES)
    total = step["total_us"]
    assert total == pytest.approx(sum(step["categories"].values()), rel=1e-9)
    assert total == pytest.approx(sum(k["total_us"] for k in step["kernels"]), rel=1e-9)
    # One step profiled: one optimizer step, one forward of each of the 2 MoE layers (moe_tiny: 3 layers, the
    # first dense) with its sort, per micro-batch (256 tokens = 1 micro-batch of 4 x 64).
    calls = {(k["name"], k["category"]): k["calls"] for k in step["kernels"]}
    assert calls[("Optimizer.step#Muon.step", "optimizer")] == 1
    assert calls[("aten::sort", "permutation/index/scatter/gather/sort")] == 2
    for category in ("matmul/grouped_mm", "attention", "routing/top-k/softmax",
                     "permutation/index/scatter/gather/sort", "elementwise/norm", "optimizer"):
        assert step["categories"][category] > 0, category
    assert step["categories"]["communication"] == 0  # one process
    names = {k["name"]: k["category"] for k in step["kernels"]}
    assert names["aten::topk"] == "routing/top-k/softmax" and names["aten::sort"].startswith("permutation")
    assert names["Optimizer.step#Muon.step"] == "optimizer"
    assert report["tokens_per_step"] == 256 and report["mfu"] is None and step["host_syncs"] is None
    for category in CATEGORIES:
        assert f"| {category} | " in markdown
    assert markdown.startswith("## moe_tiny + muon_split: one training step on cpu")


def test_a_dense_step_has_no_routing(tmp_path):
    report, _ = profile(tmp_path, "dense_tiny")
    categories = report["profile"]["categories"]
    assert categories["routing/top-k/softmax"] == 0 and categories["matmul/grouped_mm"] > 0


def test_bad_override_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "recipes/profile_step.py", "model=moe_tiny", "device=cpu",
                           "train.seq_len=-4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.seq_len" in lines[0], lines


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matmul/grouped_mm"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", "matmul/grouped_mm"),
    ("void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal<"
     "cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> >", "matmul/grouped_mm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>", "attention"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "routing/top-k/softmax"),
    ("triton_poi_fused_sigmoid_topk_0", "routing/top-k/softmax"),
    ("triton_red_fused__log_softmax_nll_loss_1", "elementwise/norm"),
    ("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::DeviceRadixSortPolicy<long>",
     "permutation/index/scatter/gather/sort"),
    ("triton_poi_fused_index_select_mul_sum_3", "permutation/index/scatter/gather/sort"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, "
     "true>", "permutation/index/scatter/gather/sort"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_2", "elementwise/norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel", "elementwise/norm"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("Memcpy DtoH (Device -> Pinned)", "other"),
])
def test_gpu_kernel_names_fall_in_their_category(name, category):
    assert categorize(name) == category


def test_the_optimizer_phase_takes_its_kernels_but_not_its_communication():
    assert categorize("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", "optimizer") == "optimizer"
    assert categorize("ncclDevKernel_AllGather_RING_LL", "optimizer") == "communication"


def test_a_gpu_trace_is_summarized_by_launching_phase_without_annotations():
    """The GPU branch of `summarize` on a trace as kineto hands it over: CPU ops (an optimizer range with a GEMM
    launched inside, a model GEMM outside), their device kernels linked by correlation id, a device-side copy of a
    record_function range (to be skipped, it spans kernels counted on their own) and a blocking sync with its copy."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from muon_recipes.train.profiling import summarize

    def cpu(id_, name, start, end, parent=None):
        event = FunctionEvent(id_, name, thread=1, start_us=start, end_us=end)
        if parent is not None:
            event.set_cpu_parent(parent)
            parent.append_cpu_child(event)
        return event

    def gpu(name, launcher, start, end, annotation=False):
        return FunctionEvent(100 + start, name, thread=7, start_us=start, end_us=end, device_type=DeviceType.CUDA,
                             linked_correlation_id=launcher.id if launcher else 0, is_user_annotation=annotation)

    gemm = "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT"
    step = cpu(1, "trainer.optimizer_step", 0, 100)
    muon = cpu(2, "Optimizer.step#Muon.step", 1, 99, parent=step)
    ns_mm = cpu(3, "aten::mm", 2, 3, parent=muon)
    model_mm = cpu(4, "aten::mm", 200, 201)
    item = cpu(5, "aten::item", 300, 301)
    events = [step, muon, ns_mm, model_mm, item, cpu(6, "cudaStreamSynchronize", 300, 301),
              gpu(gemm, ns_mm, 10, 40), gpu(gemm, model_mm, 210, 260), gpu("trainer.optimizer_step", None, 0, 100,
                                                                          annotation=True),
              gpu("Memcpy DtoH (Device -> Pinned)", item, 300, 302),
              gpu("triton_poi_fused_index_select_mul_sum_3", None, 270, 280)]
    profile = summarize(events, "cuda", steps=1)
    assert profile.categories["optimizer"] == 30 and profile.categories["matmul/grouped_mm"] == 50
    assert profile.categories["permutation/index/scatter/gather/sort"] == 10
    assert profile.categories["other"] == 2 and profile.total_us == 92  # the annotation's 100 us are not counted
    assert (profile.host_syncs, profile.device_to_host_copies) == (1, 1)
    assert [(k.name, k.category) for k in profile.kernels[:2]] == [(gemm, "matmul/grouped_mm"), (gemm, "optimizer")]


def test_covered_time_counts_overlapping_kernels_once():
    from muon_recipes.train.profiling import covered_time

    # Two streams overlapping on [2, 3], a kernel inside another, a gap [5, 7]: 0-5 and 7-9 covered.
    assert covered_time([(7, 9), (0, 3), (2, 5), (1, 2)]) == 7
    assert covered_time([]) == 0


def test_runtime_calls_and_idle_time_of_a_gpu_trace():
    """A GPU trace as the profiler gives it: launches and a blocking copy on the host, kernels on the device. The
    idle time is the span not covered by kernels; the copy's host time shows in its runtime row."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from muon_recipes.train.profiling import summarize

    def event(name, device, start, end, correlation=0):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                               id=start, linked_correlation_id=correlation, cpu_parent=None, is_async=False)

    events = [event("cudaLaunchKernel", DeviceType.CPU, 0, 5), event("cudaMemcpyAsync", DeviceType.CPU, 10, 400),
              event("cudaLaunchKernel", DeviceType.CPU, 400, 404),
              event("triton_poi_fused_mul_0", DeviceType.CUDA, 5, 300, correlation=0),
              event("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA, 380, 390),
              event("aten::mm", DeviceType.CPU, 399, 410),
              event("nvjet_sm90_tst_256x128", DeviceType.CUDA, 404, 500)]
    profile = summarize(events, "cuda", steps=1)
    assert profile.span_us == 500
    assert profile.idle_us == 500 - (295 + 10 + 96)
    rows = {r.name: r for r in profile.runtime_calls}
    assert set(rows) == {"cudaLaunchKernel", "cudaMemcpyAsync"}   # aten::mm is an operator, not a runtime call
    assert profile.runtime_calls[0].name == "cudaMemcpyAsync" and rows["cudaMemcpyAsync"].host_us == 390
    assert rows["cudaLaunchKernel"].calls == 2 and rows["cudaLaunchKernel"].longest_us == 5


def test_sync_locations_name_installed_files_by_package():
    """A sync inside torch is named from its package (`torch/cuda/__init__.py`), not by a path out of the checkout
    into the environment; the repository's own files stay relative to it."""
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import profile_step
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    installed = "/opt/env/lib/python3.12/site-packages/torch/cuda/__init__.py"
    assert profile_step._source(installed) == "torch/cuda/__init__.py"
    assert profile_step._source(str(ROOT / "muon_recipes/train/trainer.py")) == "muon_recipes/train/trainer.py"
