"""The runtime commands as a user runs them (subprocess, real artifact)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def qmoe(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_help_is_fast_and_lists_commands():
    t = time.perf_counter()
    r = qmoe("--help")
    assert r.returncode == 0 and time.perf_counter() - t < 5
    for cmd in ("tiny", "export", "run", "chat", "serve", "triton"):
        assert cmd in r.stdout


def test_run_matches_the_embedded_api(tiny_artifact):
    import runtime
    from runtime.sampling import SamplingParams

    r = qmoe("run", tiny_artifact, "--prompt", "你好", "-n", "12")
    assert r.returncode == 0, r.stderr
    engine = runtime.load(tiny_artifact)
    expected = engine.chat([{"role": "user", "content": "你好"}], SamplingParams(max_new_tokens=12))
    assert r.stdout == expected + "\n"
    flags = ("--temperature", "0.9", "--seed", "4", "--min-p", "0.1", "--presence-penalty", "-2",
             "--frequency-penalty", "0.5")
    r = qmoe("run", tiny_artifact, "--prompt", "你好", "-n", "12", *flags)
    assert r.returncode == 0, r.stderr
    expected = engine.chat([{"role": "user", "content": "你好"}], SamplingParams(
        max_new_tokens=12, temperature=0.9, seed=4, min_p=0.1, presence_penalty=-2, frequency_penalty=0.5))
    assert r.stdout == expected + "\n"


def test_run_takes_sampling_defaults_from_generation_config(tiny_artifact, tmp_path):
    """As transformers' generate and vLLM do: the fields generation_config.json sets are the
    defaults (Qwen2-Instruct's: T 0.7, top-p 0.8, top-k 20, repetition 1.05), flags win, and
    --generation-config vllm ignores the file; beam search takes none of them."""
    import json
    import shutil

    import runtime
    from runtime.sampling import SamplingParams

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art, copy_function=os.link)
    (art / "generation_config.json").unlink()  # a new file, not the shared artifact's inode
    (art / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
        "eos_token_id": [151645, 151643]}))
    engine = runtime.load(art)
    msgs = [{"role": "user", "content": "你好"}]
    qwen = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    sampled = engine.chat(msgs, SamplingParams(max_new_tokens=12, seed=3, **qwen))
    greedy = engine.chat(msgs, SamplingParams(max_new_tokens=12))
    assert sampled != greedy
    run = ("run", art, "--prompt", "你好", "-n", "12")
    assert qmoe(*run, "--seed", "3").stdout == sampled + "\n"
    assert qmoe(*run, "--seed", "3", "--generation-config", "vllm").stdout == greedy + "\n"
    flags = qmoe(*run, "--temperature", "0", "--repetition-penalty", "1.3")
    assert flags.stdout == engine.chat(msgs, SamplingParams(max_new_tokens=12, **{
        **qwen, "temperature": 0.0, "repetition_penalty": 1.3})) + "\n"
    beams = qmoe(*run, "--num-beams", "2")
    assert beams.returncode == 0, beams.stderr


def test_run_stays_greedy_unless_generation_config_asks_to_sample(tiny_artifact, tmp_path):
    """A generation_config.json without do_sample or temperature (eos ids only, as many base
    models ship) leaves qmoe run greedy, as its --temperature help says ("else 0") and as
    transformers' generate does; do_sample=true without a temperature samples at 1."""
    import json
    import shutil

    import runtime
    from runtime.sampling import SamplingParams, generation_defaults

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art, copy_function=os.link)
    (art / "generation_config.json").unlink()
    (art / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "top_p": 0.8}))
    greedy = runtime.load(art).chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=8))
    assert qmoe("run", art, "--prompt", "hi", "-n", "8").stdout == greedy + "\n"
    assert generation_defaults(art) == {"temperature": 1.0, "top_p": 0.8}  # serve: OpenAI's temperature
    (art / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert generation_defaults(art, temperature=0.0) == {"temperature": 1.0}


def test_beam_search_takes_neutral_sampling_flags(tiny_artifact):
    """Flags at their no-op values (--temperature 0, --top-p 1, ...) do not sample: beam search
    takes them, as before generation_config.json defaults; a flag that samples is refused."""
    run = ("run", tiny_artifact, "--prompt", "hi", "-n", "4", "--num-beams", "2")
    want = qmoe(*run)
    assert want.returncode == 0, want.stderr
    neutral = qmoe(*run, "--temperature", "0", "--top-p", "1", "--top-k", "0", "--min-p", "0",
                   "--repetition-penalty", "1", "--presence-penalty", "0")
    assert neutral.returncode == 0 and neutral.stdout == want.stdout, neutral.stderr
    r = qmoe(*run, "--temperature", "0", "--top-p", "0.9")
    assert r.returncode == 1 and r.stderr == "error: beam search is deterministic and unconstrained: it does not " \
        "take --top-p\n"


def test_run_with_speculation_gives_the_same_text(tiny_artifact):
    quote = "experts route every token to eight experts"
    base = ("run", tiny_artifact, "--prompt", f"Repeat: {quote}", "-n", "24", "--choice", quote)
    plain = qmoe(*base)
    spec = qmoe(*base, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}')
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout == quote + "\n"
    free = ("run", tiny_artifact, "--prompt", "你好", "-n", "12", "--temperature", "0.9", "--seed", "4", "--raw")
    assert qmoe(*free, "--speculative-config", '{"num_speculative_tokens": 2}').stdout == qmoe(*free).stdout
    bad = qmoe(*free, "--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}')
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and 'only "ngram"' in bad.stderr


def test_chat_keeps_history_resets_and_exits_on_eof(tiny_artifact):
    import runtime
    from runtime.sampling import SamplingParams

    r = qmoe("chat", tiny_artifact, "-n", "6", stdin="hello\nagain\n/reset\nhello\n")
    assert r.returncode == 0, r.stderr
    engine = runtime.load(tiny_artifact)
    p = SamplingParams(max_new_tokens=6)
    first = engine.chat([{"role": "user", "content": "hello"}], p)
    second = engine.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "again"}], p)
    out = r.stdout
    assert first in out and second in out and "(history cleared)" in out
    assert out.count(first) >= 2  # after /reset the same first answer again


def test_run_with_structured_output(tiny_artifact, tmp_path):
    import json
    import re

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    for arg in (str(tmp_path / "s.json"), json.dumps(schema)):
        r = qmoe("run", tiny_artifact, "--prompt", "Give JSON", "-n", "30", "--json-schema", arg)
        assert r.returncode == 0, r.stderr
        value = json.loads(r.stdout)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
    r = qmoe("run", tiny_artifact, "--prompt", "x", "-n", "20", "--regex", "[a-c]{3}-[0-9]{2}")
    assert r.returncode == 0 and re.fullmatch("[a-c]{3}-[0-9]{2}", r.stdout.rstrip("\n")), r.stdout
    r = qmoe("run", tiny_artifact, "--prompt", "x", "--choice", "yes", "--choice", "no", "--temperature", "1")
    assert r.returncode == 0 and r.stdout in ("yes\n", "no\n")


def test_run_errors_are_one_line(tiny_artifact, tmp_path):
    cases = [
        (("run", tmp_path, "--prompt", "x"), "not a qmoe artifact"),
        (("run", tiny_artifact, "--prompt", "x", "--top-p", "0"), "top_p must be in (0, 1]"),
        (("run", tiny_artifact, "--prompt", "x", "-n", "40000"), "over the limit of 32768"),
        (("run", tiny_artifact, "--prompt", "x", "--frequency-penalty", "2.5"), "frequency_penalty must be in [-2, 2]"),
        (("run", tiny_artifact, "--prompt", "x", "--min-p", "-1"), "min_p must be in [0, 1]"),
        (("run", tiny_artifact, "--prompt", "x", "--regex", "(x"), "invalid regex"),
        (("run", tiny_artifact, "--prompt", "x", "--json-schema", "nofile.json"), "is not inline JSON and cannot"),
        (("run", tiny_artifact, "--prompt", "x", "--json-schema", "{bad"), "--json-schema: the JSON schema is not"),
        (("run", tiny_artifact, "--prompt", "x", "--regex", "a", "--choice", "b"), "give one of"),
        (("run", tiny_artifact, "--prompt", "x", "--rope-scaling", "static"), "needs rope_scaling"),
        (("chat", tiny_artifact, "-n", "40000"), "leaves no room for a prompt in the 32768-token context"),
    ]
    for args, msg in cases:
        r = qmoe(*args)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


def test_usage_errors_are_one_line_and_bare_qmoe_shows_help(tiny_artifact):
    for args, msg in [(("run", tiny_artifact, "-p", "x", "--rope-scaling", "foo"), "Invalid value for '--rope-scaling'"),
                      (("run", tiny_artifact, "-n", "abc"), "Invalid value for '--max-new-tokens'"),
                      (("export",), "Missing argument 'CHECKPOINT_DIR'"),
                      (("nosuch",), "No such command 'nosuch'")]:
        r = qmoe(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "--help)" in r.stderr
    r = qmoe()
    assert "Usage:" in r.stdout + r.stderr and "export" in r.stdout + r.stderr
    assert qmoe("--help").returncode == 0


def test_sigterm_turned_into_another_error_by_a_library_still_exits_as_terminated(tmp_path):
    """SIGTERM raises SystemExit wherever Python is; torch can catch it inside its own call and
    raise a ValueError instead (seen once in CI: "could not determine the shape of object type
    'torch.storage.UntypedStorage'"). The command still ends as terminated (143), not as a failure."""
    import signal

    script = tmp_path / "run.py"
    script.write_text(
        "import os, signal, sys\n"
        "from runtime import cli\n"
        "@cli.main.command()\n"
        "def victim():\n"
        "    with cli._sigterm_cleans_up():\n"
        "        try:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary: the handler runs\n"
        "        except SystemExit:\n"
        "            raise ValueError('could not determine the shape of object type')\n"
        "cli.main(['victim'])\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip() == "terminated"
