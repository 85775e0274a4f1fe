"""Checks of peer_bench.py that need neither torch nor diffusers: the FLOP count against design
section 11's check values and the engine's own count, the argument and --compare errors.
Run: python3 tools/peer-bench/test_peer_bench.py"""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb  # noqa: E402 -- after the path that finds it


def engine_bench_doc(**over):
    doc = {"device": "cpu (2 threads)", "shape": "flux-tiny", "res": 64, "batch": 1, "steps": 3, "image_tokens": 16,
           "text_tokens": 8, "seconds_per_step": 0.002, "seconds_per_step_median": 0.001, "seconds_per_image": 0.006,
           "flops_per_step": 5341184, "flops_per_second": 2.6e9, "mfu": None, "gemm_flops_per_second": 1e11,
           "fraction_of_gemm": 0.026, "memory_peak_bytes": None, "memory_driver_used_bytes": None,
           "flops_by_class": {"attention": 294912, "gemm": 5046272}}
    doc.update(over)
    return doc


def peer_doc(**over):
    doc = {"device": "cpu (2 threads)", "torch": "x", "dtype": "f32", "gemm_side": 512, "gemm_flops_per_second": 5e10,
           "peer": "diffusers test", "shape": "flux-tiny", "res": 64, "batch": 1, "steps": 3, "image_tokens": 16,
           "text_tokens": 8, "build_seconds": 0.0, "warmup_seconds": 0.1, "seconds_per_step": 0.004,
           "seconds_per_step_median": 0.004, "seconds_per_image": 0.012, "flops_per_step": 5341184,
           "flops_per_second": 1.3e9, "flops_by_class": {}, "memory_peak_bytes": None, "memory_driver_used_bytes": None,
           "peak_flops_per_second": None, "mfu": None, "fraction_of_gemm": 0.026,
           "attention": [{"kernel": "sdpa fwd", "backend": "flash", "shape": "[1,4,256,128]", "seconds": 0.01,
                          "flops": 1.3e8, "rate": 1.3e10, "unit": "FLOP/s"},
                         {"kernel": "sdpa bwd", "backend": "flash", "shape": "[1,4,256,128]", "seconds": 0.025,
                          "flops": 3.25e8, "rate": 1.3e10, "unit": "FLOP/s"}],
           "attention_skipped": [], "attention_iters": 20}
    doc.update(over)
    return doc


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = pb.main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


class FlopCount(unittest.TestCase):
    def test_design_check_values(self):
        # design.md section 11: FLUX.1-dev, 512 text tokens, batch 1: 21.50 TFLOP at 512x512, 74.38 at 1024x1024.
        for img_tokens, tflop in ((1024, 21.50), (4096, 74.38)):
            total = sum(pb.flux_step_flops(pb.PRESETS["flux-dev"], 1, img_tokens, 512).values())
            self.assertAlmostEqual(total / 1e12, tflop, places=2)

    def test_equals_the_engine_trace(self):
        # `engine bench --shape flux-tiny --res 64 --txt-tokens 8 --device cpu --json` (2026-11-27).
        self.assertEqual(pb.flux_step_flops(pb.PRESETS["flux-tiny"], 1, 16, 8), {"gemm": 5046272, "attention": 294912})
        # `engine plan --shape flux-dev --res 1024`: attention 20.0% of 74.38 TFLOP.
        by_class = pb.flux_step_flops(pb.PRESETS["flux-dev"], 1, 4096, 512)
        self.assertAlmostEqual(by_class["attention"] / 1e12, 14.87, places=2)

    def test_batch_scales_linearly(self):
        one = sum(pb.flux_step_flops(pb.PRESETS["flux-small"], 1, 256, 32).values())
        self.assertEqual(sum(pb.flux_step_flops(pb.PRESETS["flux-small"], 3, 256, 32).values()), 3 * one)

    def test_attention_count(self):
        self.assertEqual(pb.attention_flops(4608, 24, 128), 4 * 4608 ** 2 * 128 * 24)


class Arguments(unittest.TestCase):
    def expect_usage_error(self, argv, words):
        code, _, err = run_main(argv)
        self.assertEqual(code, 2)
        self.assertNotIn("Traceback", err)
        self.assertIn(words, err)

    def test_bad_values_are_named(self):
        self.expect_usage_error(["--res", "100"], "--res 100")
        self.expect_usage_error(["--steps", "0"], "--steps must be at least 1")
        self.expect_usage_error(["--shape", "flux-huge"], "flux-huge")
        self.expect_usage_error(["--shape", "flux-dev", "--device", "cpu"], "flux-small or flux-tiny")
        self.expect_usage_error(["--load", "x.json"], "--compare")

    def test_missing_compare_file_fails_before_running(self):
        code, _, err = run_main(["--device", "cpu", "--shape", "flux-tiny", "--compare", "/nonexistent/bench.json"])
        self.assertEqual(code, 1)
        self.assertIn("/nonexistent/bench.json", err)
        self.assertNotIn("Traceback", err)


class Compare(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.peer = self.write("peer.json", peer_doc())

    def write(self, name, doc):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(doc if isinstance(doc, str) else json.dumps(doc))
        return path

    def test_side_by_side_with_ratios(self):
        bench = self.write("bench.json", engine_bench_doc())
        kernels = self.write("kernels.json", {"device": "cpu (2 threads)", "iters": 5, "kernels": [
            {"kernel": "attention fwd", "shape": "[1,4,256,128]", "seconds": 0.005, "rate": 2.6e10},
            {"kernel": "attention bwd", "shape": "[1,4,256,128]", "seconds": 0.05, "rate": 6.5e9}]})
        code, out, err = run_main(["--load", self.peer, "--compare", bench, "--compare", kernels])
        self.assertEqual(code, 0, err)
        step = next(line for line in out.splitlines() if line.startswith("step (mean)"))
        self.assertTrue(step.endswith("2.00x"), step)  # peer 4 ms / engine 2 ms
        attn = next(line for line in out.splitlines() if line.startswith("attn fwd"))
        self.assertTrue(attn.endswith("2.00x"), attn)  # engine 26 / peer 13 GFLOP/s
        attn_bwd = next(line for line in out.splitlines() if line.startswith("attn bwd"))
        self.assertTrue(attn_bwd.endswith("0.50x"), attn_bwd)  # engine 6.5 / peer 13 GFLOP/s
        self.assertNotIn("FLOP counts differ", out)

    def test_other_work_is_refused(self):
        bench = self.write("bench.json", engine_bench_doc(res=128))
        code, _, err = run_main(["--load", self.peer, "--compare", bench])
        self.assertEqual(code, 1)
        self.assertIn("res 128 (engine) vs 64 (peer)", err)

    def test_unknown_or_broken_files_are_named(self):
        for content, words in (({"hello": 1}, "neither"), ("{", "not JSON"),
                               ({k: v for k, v in engine_bench_doc().items() if k != "res"}, "key 'res' missing"),
                               ({"kernels": [{"kernel": "x"}]}, "kernels[0] has no 'shape'")):
            path = self.write("engine.json", content)
            code, _, err = run_main(["--load", self.peer, "--compare", path])
            self.assertEqual(code, 1)
            self.assertIn(path, err)
            self.assertIn(words, err)


if __name__ == "__main__":
    unittest.main()
