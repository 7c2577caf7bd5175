"""The kit run the way plugin authors run it: through pytest, against installed plugins."""
from __future__ import annotations

import pytest

# Import the kit (and through it torch) out here: pytester's in-process runs restore
# sys.modules afterwards, and re-importing torch's extension modules can crash.
import dsr1_sdk.testing.attention  # noqa: F401  # imported for its side effect on sys.modules
import dsr1_sdk.testing.device  # noqa: F401  # same
import dsr1_sdk.testing.pruning  # noqa: F401  # same

pytest_plugins = ["pytester"]


def test_case_table_is_parametrized_by_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from dsr1_sdk.testing import AttentionConformance

        class TestEager(AttentionConformance):
            plugin = "eager"
        """
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "decode_gqa_4to1 or head_dim_80")
    result.assert_outcomes(passed=2)
    listed = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    assert "test_case[prefill_mha]" in listed.stdout.str() and "test_case[padded_batch]" in listed.stdout.str()


def test_a_wrong_oracle_makes_the_kit_fail(pytester: pytest.Pytester) -> None:
    """Proof that the kit compares outputs: the same plugin against a scale-less oracle fails."""
    pytester.makepyfile(
        """
        from dsr1_sdk.reference import softmax_attention
        from dsr1_sdk.testing import AttentionConformance

        class TestEagerWrongOracle(AttentionConformance):
            plugin = "eager"

            def reference(self, query, key, value, mask=None, scale=None):
                return softmax_attention(query, key, value, mask=mask, scale=1.0)
        """
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "prefill_mha")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*max |diff|*"])


def test_missing_plugin_fails_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from dsr1_sdk.testing import PruningConformance

        class TestGhost(PruningConformance):
            plugin = "ghost"
        """
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "entry_point")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no entry point 'ghost' in group 'dsr1.pruning'*"])


def test_conformance_marker_and_device_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        from dsr1_sdk.testing import DeviceConformance

        class TestCpu(DeviceConformance):
            plugin = "cpu"

        def test_device_option_reaches_the_kit():
            assert os.environ["DSR1_TEST_DEVICE"] == "cpu"
            assert TestCpu.target_device() == "cpu"
        """
    )
    result = pytester.runpytest_inprocess(
        "-q", "-p", "no:cacheprovider", "--dsr1-device", "cpu", "-m", "not conformance"
    )
    result.assert_outcomes(passed=1)
    selected = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider", "-m", "conformance")
    assert "test_device_option_reaches_the_kit" not in selected.stdout.str()
    assert "TestCpu::test_memory_info" in selected.stdout.str()
