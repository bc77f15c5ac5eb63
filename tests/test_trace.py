"""`generate --trace` shows every stage in order, and what it shows is what ran: each decode step's first
candidate is the token the answer holds, and tracing changes nothing in the answer."""
import ast
import re

from tinyllava.generate import main
from tinyllava.weights import demo_photos


def run(capsys, *extra):
    main(["--image", str(demo_photos()["chelsea.png"]), "-p", "What animal is this?", "-n", "6", "-t", "1", *extra])
    out = capsys.readouterr()
    return out.out.strip(), out.err


def test_trace_shows_each_stage_and_the_tokens_chosen(capsys):
    plain, _ = run(capsys)
    answer, trace = run(capsys, "--trace")
    assert answer == plain                                  # tracing only looks
    stages = [int(n) for n in re.findall(r"^\[(\d)\] ", trace, re.M)]
    assert stages == [1, 2, 3, 4, 5, 6, 7]
    assert "vision tower: 11 blocks" in trace and "decoder: 30 blocks" in trace
    assert re.search(r"\[5\] prompt: \d+ positions\n.*\[IMAGE x196\]", trace)
    literal = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""  # the repr of a token, in either quotes
    steps = re.findall(rf"^  step +(\d+) \(.*?ms\): {literal} \d\.\d\d", trace, re.M)  # greedy: the first candidate
    assert [int(s) for s, _ in steps] == list(range(len(steps))) and 1 <= len(steps) <= 6
    chosen = "".join(ast.literal_eval(t) for _, t in steps).replace("<|im_end|>", "")
    assert chosen.strip() == answer
