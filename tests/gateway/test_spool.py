"""The durable spool on its own: order, restart, torn records, the size cap."""

from services.gateway.spool import Spool, SpooledEvent


def events(count: int, start: int = 0) -> list[SpooledEvent]:
    return [
        SpooledEvent("t.feedback.v1", f"k{n}".encode(), f'{{"n": {n}}}'.encode())
        for n in range(start, start + count)
    ]


def test_events_come_back_in_order_and_commit_frees_them(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=256)

    spool.append(events(50))
    first, cursor = spool.read(20)
    spool.commit(cursor)
    rest, cursor = spool.read(100)
    spool.commit(cursor)

    assert [e.key for e in first + rest] == [f"k{n}".encode() for n in range(50)]
    assert spool.empty
    assert len(list(tmp_path.glob("seg-*.log"))) == 1


def test_a_restart_resumes_after_the_last_commit(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    spool.append(events(30))
    _, cursor = spool.read(10)
    spool.commit(cursor)
    spool.close()

    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    replayed, _ = reopened.read(100)

    assert [e.key for e in replayed] == [f"k{n}".encode() for n in range(10, 30)]


def test_a_torn_last_record_is_cut_away_and_the_rest_survives(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(events(5))
    spool.close()
    segment = next(tmp_path.glob("seg-*.log"))
    segment.write_bytes(segment.read_bytes()[:-3])

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    replayed, _ = reopened.read(100)
    reopened.append(events(1, start=99))
    after, _ = reopened.read(100)

    assert [e.key for e in replayed] == [b"k0", b"k1", b"k2", b"k3"]
    assert [e.key for e in after][-1] == b"k99"


def test_the_cap_refuses_what_does_not_fit(tmp_path):
    one = len(events(1)[0].encode())
    spool = Spool(tmp_path, max_bytes=one * 3)

    appended = spool.append(events(5))

    assert appended == 3
    assert spool.size_bytes == one * 3
