"""The console progress of long verbs: throttled lines, counts, an ETA, one final line."""

import io

from pipelines.tracking.progress import Progress


def test_lines_are_throttled_and_the_last_one_is_always_printed():
    out = io.StringIO()
    p = Progress("tokenize", total=4, every_s=3600, stream=out)
    for _ in range(3):
        p.update(done=1, samples=8)
    assert out.getvalue() == ""  # throttled: nothing within the hour
    p.update(done=1, samples=8)
    p.close()
    p.close()  # once
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[vqtok] tokenize: 4/4 shards, 32 samples")
    assert "samples/s" in lines[0] and "ETA" not in lines[0]  # finished: no ETA


def test_every_update_printed_with_an_eta_while_unfinished():
    out = io.StringIO()
    p = Progress("ablate", total=3, unit="runs", every_s=0, stream=out)
    p.update(done=1)
    p.update(done=1)
    p.close()  # the last line already said 2/3: not repeated
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0].split(", ETA")[0] for line in lines] == [
        "[vqtok] ablate: 1/3 runs", "[vqtok] ablate: 2/3 runs"]
    assert all("ETA" in line and "samples" not in line for line in lines)
