"""Test tiers and the golden-curve flag, in one place.

`make test` runs every tier that can run on the machine (CI); `make test-fast` deselects
``-m "not slow and not multiprocess and not gpu"`` for the inner loop (about 2 minutes on 2 cores).
A test joins a tier here, by file, by name or by the fixture it uses, never by a decorator in its
file, so the tiers can be read and rebalanced in one table (durations: ``pytest --durations=60``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# slow: trainings long enough to check a paper's claim, a whole model set exported or compiled
# (AOTInductor, the C++ client), benchmark tools run end to end: seconds to tens of seconds each.
SLOW = {
    "test_serving_cli.py",  # every test shares one fit exported with --aot (C++ compile), one builds the client
    "test_bench_serving.py",
    "test_bench_correlation.py::test_tiny_run_reports_every_model_and_correlation",
    "test_dupn.py::test_learns_purchasing_power_from_the_behaviour_sequence",
    "test_youtube.py::test_shallow_tower_ranks_the_position_free_truth_best",
    "test_esm_models.py::test_esmm_pcvr_over_all_impressions_is_not_worse_than_base",
    "test_esm_models.py::test_switching_kernel_backend_keeps_parameters_and_predictions",  # trains, then Triton
    "test_plan_tool.py::test_large_config_on_64_gpus",  # the planner over 30 tables and 64 GPUs
    "test_plan_tool.py::test_tools_entry_point",  # a subprocess
    "test_training.py::test_resumed_training_equals_uninterrupted_training",
    "test_training.py::test_resumed_mid_epoch_continues_with_the_next_batch",
    "test_training.py::test_signal_mid_epoch_saves_the_step_exits_75_and_resumes_exactly",  # CLI subprocesses
    "test_serving_split.py::test_split_scores_equal_the_monolithic_program",
    "test_serving_score.py::test_command_line_prints_nothing_but_the_error",  # a CLI subprocess
    "test_bench_train.py::test_both_training_paths_train_one_epoch",  # tools/bench_train.py in a subprocess
    "test_fault_corpus.py::test_every_fault_ends_in_one_line_and_status_2",  # a forked CLI process per case, ~40 s
    "test_quiet.py::test_a_fit_prints_none_of_the_known_warnings_unless_debugging",  # 2 CLI subprocesses, ~17 s
    "test_heap.py",  # 2 fresh processes (the malloc setting is per process), ~10 s
    # trainings of several seconds each (kept out of make test-fast's 2 minutes)
    "test_training.py::test_single_process_checkpoint_consolidates_exports_and_evaluates_but_a_file_does_not_resume",
    "test_training.py::test_checkpoint_restores_weights_sparse_optimizer_and_statistics",
    "test_layout.py::test_every_tool_script_still_answers_its_command_line",  # one subprocess per tools script
    "test_table_memory.py::test_a_table_that_fits_still_trains",
    "test_bad_loss.py::test_cli_stop_is_one_line_and_keeps_the_last_good_checkpoint",
    "test_daily.py::test_daily_resumes_after_a_kill_without_retraining_finished_days",  # ~1 min each (subprocesses)
    "test_daily.py::test_a_warm_day_starts_from_the_previous_days_weights",  # daily subprocesses, ~40 s
}
# multiprocess: 2 gloo processes (run_ranks, mp.spawn, Lightning's own launcher in a CLI subprocess)
MULTIPROCESS = {
    "test_sharded_cli.py",
    "test_sharded_training.py::test_sharded_training_equals_one_process",
    "test_sharded_training.py::test_sharded_checkpoint_resumes_on_another_world_size",
    "test_sharded_training.py::test_checkpoint_moves_between_the_single_process_path_and_two_processes",
    "test_sharded_training.py::test_single_process_sequence_tables_do_not_resume_on_two_cpu_processes",
    "test_sharded_training.py::test_two_processes_predict_from_a_single_file",
    "test_metrics_distributed.py::test_two_processes_match_one",
    "test_embeddings.py::test_sharded_tables_are_drawn_from_their_configs",
    "test_weighting.py::test_gradnorm_under_the_sharded_strategy_keeps_one_set_of_weights",
    "test_table_memory.py::test_two_processes_stop_with_the_plans_message",
    "test_bad_loss.py::test_two_processes_both_skip_when_one_rank_has_a_bad_batch",
    "test_bad_loss.py::test_two_processes_both_stop_and_name_the_bad_rank",
    "test_warm_start.py::test_warm_start_moves_between_world_sizes",
    "test_warm_start.py::test_column_wise_weights_warm_start_one_process_unless_their_optimizer_state_is_kept",
    # 2-process CLI runs signalled, stopped or killed mid-epoch (13-30 s each on 2 shared cores; the resume
    # test 31-95 s: 3 runs)
    "test_preemption_ranks.py::test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly",
    "test_preemption_ranks.py::test_signal_to_a_launched_run_ends_it_with_75",
    "test_preemption_ranks.py::test_a_peer_that_stops_answering_ends_the_run_with_one_line",
    "test_preemption_ranks.py::test_a_stopped_launched_rank_is_killed_when_the_run_ends",
    "test_preemption_ranks.py::test_a_signal_in_the_sanity_check_exits_75_with_nothing_to_save",  # 1 and 2 processes
    "test_preemption_ranks.py::test_a_rank_that_starts_late_still_joins_and_the_collectives_keep_their_timeout",  # ~25s
}
# gpu: CUDA only (they also skip themselves where CUDA is missing)
GPU = {
    "test_kernel_gate_mix.py::test_cuda_matches_reference",
    "test_kernel_gate_mix.py::test_cuda_backends_agree",
    "test_kernel_prob_chain.py::test_cuda_matches_float64_reference",
    "test_ple.py::test_cuda_backends_agree_on_masked_gates",
    "test_data_pipeline.py::test_pin_memory_and_cuda_keep_contents",
}
# by fixture: every test of a module-scoped fixture pays for it
SLOW_FIXTURES = {"test_serving_export.py": "exported"}  # torch.export of every registered model


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs a worker per core) each worker takes its share of the
    cores, and so do the processes its tests start: with torch's default, every core in every
    worker, a compute-bound test took 46 s on 2 cores instead of under 6 (OpenMP threads spinning
    for a core the other worker holds)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.json from this run instead of only comparing with them")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return request.config.getoption("--update-golden")


def _tiers(item: pytest.Item) -> set[str]:
    file, name = item.path.name, getattr(item, "originalname", item.name)
    keys = {file, f"{file}::{name}"}
    tiers = {tier for tier, table in (("slow", SLOW), ("multiprocess", MULTIPROCESS), ("gpu", GPU)) if keys & table}
    if SLOW_FIXTURES.get(file) in getattr(item, "fixturenames", ()):
        tiers.add("slow")
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("accelerator") == "gpu":  # the NCCL variants of the gloo tests
        tiers.add("gpu")
    return tiers


def _stale(items: list[pytest.Item]) -> list[str]:
    """Table entries that name no file here, or no test in a collected module (a rename would
    otherwise move a slow test into the fast tier without a word)."""
    modules = {item.path.name: item.module for item in items if getattr(item, "module", None) is not None}
    stale = []
    for entry in SLOW | MULTIPROCESS | GPU | set(SLOW_FIXTURES):
        file, _, name = entry.partition("::")
        if not (Path(__file__).parent / file).is_file() or (name and file in modules
                                                              and not hasattr(modules[file], name)):
            stale.append(entry)
    return sorted(stale)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stale = _stale(items)
    if stale:
        raise pytest.UsageError(f"tests/conftest.py's tiers name tests that do not exist: {stale}")
    for item in items:
        for tier in sorted(_tiers(item)):
            item.add_marker(getattr(pytest.mark, tier))
