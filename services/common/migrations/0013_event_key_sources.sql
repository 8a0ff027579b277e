-- Where each stored event came from (its record's topic, partition and offset), so a
-- repeat of it can be told apart: the same record read again (a replay after a crash
-- or a rebalance) is only counted as a duplicate; another record carrying a stored
-- event_id (a producer's retry, a producer's bug) is dead-lettered as `duplicate`.
-- Keys stored before this migration have no source: their repeats are only counted.
ALTER TABLE event_keys
    ADD COLUMN source_topic text,
    ADD COLUMN source_partition integer,
    ADD COLUMN source_offset bigint;
