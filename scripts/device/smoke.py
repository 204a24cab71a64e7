"""Device smoke test (call 1): versions, then benchmarks/autoround.py on a tiny random Llama on CUDA."""
import importlib.metadata as md, os, random, subprocess, sys, time
from pathlib import Path
t0 = time.time()
for name in ["torch", "transformers", "accelerate", "numpy", "pyarrow", "fsspec", "typing_extensions", "huggingface_hub",
             "pandas", "triton", "llmcompressor", "compressed-tensors", "auto-round", "datasets", "pydantic", "pydantic_core"]:
    try:
        print("VERSION", name, md.version(name))
    except Exception as e:
        print("VERSION", name, "missing", e)
sys.path.insert(0, str(Path.cwd() / "tests"))
from models import save_tiny_llama  # noqa: E402
folder = Path("/tmp/tiny"); save_tiny_llama(folder)
random.seed(0)
text = Path("/tmp/tiny.txt"); text.write_text(" ".join(f"w{random.randrange(3, 256)}" for _ in range(20000)))
print(f"setup {time.time() - t0:.1f} s", flush=True)
rows = ("fp,w3g64:autoround,w3g64:spinquant_qep_refit2_tuned1,w3g64:gptq_best,w3g64:autoround_eqtime,"
        "w3g64a:autoround_zpfix,w3g64a:autoround,w2g64a:spinquant_qep_refit2_tuned3_lr0.01,"
        "w4g64a:spinquant_qep_refit2_best")
env = dict(os.environ, AUTOROUND_TEST_ITERS="2")
out = Path(os.environ.get("OUT", "/tmp")) / "smoke.md"
cmd = [sys.executable, "benchmarks/autoround.py", "--model", str(folder), "--calib", str(text), "--eval", str(text),
       "--cross-eval", str(text), "--num-samples", "8", "--seq-len", "64", "--eval-windows", "4",
       "--cross-eval-windows", "2", "--rows", rows, "--output", str(out), "--deadline", "120", "--no-warm-up"]
print(" ".join(cmd), flush=True)
rc = subprocess.call(cmd, env=env)
print(f"SMOKE rc={rc} in {time.time() - t0:.1f} s", flush=True)
