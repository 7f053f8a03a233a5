"""Remove each defence of the service (tests/test_guard.py, tests/test_runtime.py) in turn, run the tests that name it, expect them to fail; restore.

Usage: python3 scripts/defence_check.py [NAME ...]   (from the project root, with .venv installed; ~3 min;
       names pick some defences only)
Prints one line per defence: `OK (failed)` when its tests caught the removal, `MISSED` when they did not.
Exit status 1 when any was missed. Each entry is (name, file, the code of the defence, what replaces it,
pytest -k expression)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
G, L, T, R = "src/lingtune/serve/guard.py", "src/lingtune/serve/limits.py", "src/lingtune/serve/tasks.py", "src/lingtune/serve/runtime.py"
S, A = "src/lingtune/serve/service.py", "src/lingtune/serve/app.py"
M = [
 ("route allowlist", G, 'route = ROUTES.get(scope["path"])', 'route = ROUTES.get(scope["path"], Route(frozenset({"GET", "POST"}), model_work=False))', "undocumented"),
 ("405", G, 'if scope["method"] not in route.methods and', 'if False and', "wrong_method"),
 ("websocket close", G, 'return await send({"type": "websocket.close", "code": 1008})', 'return await self.app(scope, receive, send)', "websockets"),
 ("key", G, 'if self.key_hash and not route.open', 'if False and self.key_hash and not route.open', "key_protects"),
 ("loopback only", G, 'if self.loopback_only and', 'if False and', "only_local"),
 ("bind host", R, 'return cfg.host if api_key or cfg.allow_anonymous else LOCAL_HOST', 'return cfg.host', "binds_loopback"),
 ("service host", S, 'http={"host": bind_host(CFG, API_KEY)', 'http={"host": CFG.host', "safe_host"),
 ("fallback not ready", A, 'and not self.engine.errored and not self.fallback', 'and not self.engine.errored', "fallback_model_is"),
 ("cli host", "src/lingtune/cli.py", '"--host", bind_host(cfg, os.environ.get(cfg.api_key_env) or None)]', '"--host", cfg.host]', "lingtune_serve_binds"),
 ("int4 refused", R, '    if reason := unsupported_here(ref.base):', '    if reason := None:', "cannot_run_here"),
 ("strict ints", L, '    if type(value) is not int:  #', '    if False:  #', "json_integers"),
 ("int ranges", L, 'if not 1 <= value <= bound:', 'if False:', "json_integers"),
 ("depth", L, '        if depth > max_depth:', '        if False:', "deep_nesting"),
 ("recursion catch", L, 'except RecursionError:', 'except ZeroDivisionError:', "deep_nesting"),
 ("body cap", G, '        if size > limit:\n', '        if False:\n', "caps_its_body"),
 ("declared length", G, 'if declared.isdigit() and int(declared) > limit:', 'if False:', "declared_oversize"),
 ("body deadline", G, 'return await asyncio.wait_for(_read_body(receive, limit), self.limits.body_timeout_s)', 'return await _read_body(receive, limit)', "never_finishes"),
 ("token limit", L, '    if longest > limits.max_prompt_tokens:', '    if False:', "prompt_limit or texts_are_limited"),
 ("whole conversation", L, '    return ["".join(_strings(body))]', '    return ["".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))]', "prompt_limit"),
 ("batch", L, '    if len(prompts) > limits.max_batch:', '    if False:', "texts_are_limited"),
 ("503 before model", G, '        if tokenizer is None:\n            raise', '        if tokenizer is None:\n            return\n            raise', "wait_for_the_model"),
 ("models root", G, '            send = _without_local_paths(send)', '            pass', "hides_local"),
 ("concurrency", G, 'if self.active >= self.limits.max_concurrency:', 'if False:', "concurrency"),
 ("fitting prompts", T, '        if used + budget > max_model_len:', '        if False:', "cannot_fit"),
 ("cancel on disconnect", T, '    await asyncio.wait({jobs, watch}, return_when=asyncio.FIRST_COMPLETED)', '    await asyncio.wait({jobs})', "cancelled_when"),
]
TEST_FILES = ["tests/test_guard.py", "tests/test_runtime.py"]
missed = []
for name, f, old, new, k in M:
    if sys.argv[1:] and name not in sys.argv[1:]:
        continue
    p = ROOT / f; src = p.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run(["timeout", "120", f"{ROOT}/.venv/bin/python", "-m", "pytest", *TEST_FILES, "-q", "-p", "no:cacheprovider", "-k", k],
                           cwd=ROOT, capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or ["?"])[-1]
        print(f"{'OK (failed)' if r.returncode != 0 else 'MISSED    '} {name:22s} rc={r.returncode} {last}", flush=True)
        if r.returncode == 0:
            missed.append(name)
    finally:
        p.write_text(src)
sys.exit(1 if missed else 0)
