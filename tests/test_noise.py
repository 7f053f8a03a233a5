"""Stage output reads like a tool's: the stack's messages a user can do nothing about are filtered by
`lingtune.env.quiet_library_noise` (what the CLI runs first), and everything else still shows.

Each case runs in a fresh interpreter (the filters are process-wide) and emits the message through the
library's own channel: bitsandbytes' module logger, Lightning's `rank_zero_warn`."""

import subprocess
import sys
import textwrap

import pytest

EMIT = {
    # bitsandbytes logs this at import on AVX-512 BF16 CPUs when the optional `kernels` package is absent
    "bitsandbytes": """
        from bitsandbytes.backends.cpu import ops
        ops.logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        ops.logger.warning("KEEP: a bitsandbytes warning that matters")
    """,
    # Lightning, when lingtune's resumable fit starts without a checkpoint or in a folder it resumes from
    "lightning": """
        from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
        rank_zero_warn('.fit(ckpt_path="last") is set, but there is no last checkpoint available.'
                       " No checkpoint will be loaded. HINT: Set `ModelCheckpoint(..., save_last=True)`.")
        rank_zero_warn("Checkpoint directory /tmp/x/sft_checkpoints exists and is not empty.")
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero_warn("KEEP: a Lightning warning that matters")
    """,
}
NOISE = ("gemm_4bit_forward", "no last checkpoint", "exists and is not empty", "💡 Tip")


def stderr_of(source: str, quiet: bool) -> str:
    prelude = "import logging\nlogging.basicConfig(level=logging.INFO)\n"
    if quiet:
        prelude += "from lingtune.env import quiet_library_noise\nquiet_library_noise()\n"
    run = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(source)],
                         capture_output=True, text=True, timeout=300, check=True)
    return run.stderr


@pytest.mark.parametrize("library", sorted(EMIT))
def test_noise_is_filtered_and_the_rest_still_shows(library):
    loud = stderr_of(EMIT[library], quiet=False)
    emitted = [noise for noise in NOISE if noise in loud]
    assert emitted and "KEEP:" in loud  # the library really says these things through this channel

    quiet = stderr_of(EMIT[library], quiet=True)
    assert [noise for noise in emitted if noise in quiet] == []
    assert "KEEP:" in quiet
