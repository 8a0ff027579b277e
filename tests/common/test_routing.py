from services.common.routing import BUCKETS, Route, RoutingTable, Variant, bucket_of


def make_route(canary_buckets: int) -> Route:
    return Route(
        name="bot",
        experiment_id="exp",
        variants=(
            Variant(
                "bot-v2",
                "http://u/v1",
                "m",
                canary_buckets,
                adapter="a2",
                arm="treatment",
            ),
            Variant(
                "bot-v1", "http://u/v1", "m", BUCKETS - canary_buckets, arm="control"
            ),
        ),
    )


def test_bucket_is_stable_and_in_range():
    buckets = [bucket_of("bot", f"user-{i}") for i in range(2000)]

    assert buckets == [bucket_of("bot", f"user-{i}") for i in range(2000)]
    assert all(0 <= b < BUCKETS for b in buckets)
    assert len(set(buckets)) > 1500


def test_growing_canary_keeps_everyone_already_in_it():
    users = [f"user-{i}" for i in range(5000)]
    small, large = make_route(500), make_route(2500)

    in_small = {u for u in users if small.assign(bucket_of("bot", u)).name == "bot-v2"}
    in_large = {u for u in users if large.assign(bucket_of("bot", u)).name == "bot-v2"}

    assert in_small <= in_large
    assert 0.03 < len(in_small) / len(users) < 0.07
    assert 0.22 < len(in_large) / len(users) < 0.28


def test_table_round_trips_through_proto_and_json():
    table = RoutingTable(version=7, routes={"bot": make_route(500)})

    assert RoutingTable.from_proto(table.to_proto()) == table
    assert RoutingTable.from_json(table.to_json()) == table


def test_weights_must_cover_every_bucket():
    try:
        Route(name="bot", variants=(Variant("v", "u", "m", 10),))
    except ValueError as error:
        assert "10000" in str(error)
    else:
        raise AssertionError("a route with 10 buckets was accepted")
