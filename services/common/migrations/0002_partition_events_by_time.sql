-- Interactions and feedback partitioned by day of `stored_at`, so retention drops
-- whole partitions. A partitioned table's unique keys must include the partition key,
-- so de-duplication moves to two key tables: `event_keys` (every stored event_id,
-- interactions and feedback alike) and `interaction_keys` (every stored
-- interaction_id). The collector inserts the keys and the rows in one transaction,
-- rows only for keys that were new, which keeps exactly-once effects.
--
-- Partitions are named <table>_pYYYYMMDD (UTC days). ensure_event_partitions()
-- creates them ahead of time; a DEFAULT partition catches a row whose day has no
-- partition yet, so an insert never fails for lack of one. drop_expired_event_data()
-- applies the retention.

CREATE TABLE event_keys (
    event_id    uuid PRIMARY KEY,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_keys_stored ON event_keys (stored_at);

CREATE TABLE interaction_keys (
    interaction_id  uuid PRIMARY KEY,
    stored_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX interaction_keys_stored ON interaction_keys (stored_at);

-- The old tables step aside (their index names are schema-wide, so they move too).
ALTER TABLE interactions RENAME TO interactions_unpartitioned;
ALTER INDEX interactions_route_time RENAME TO interactions_unpartitioned_route_time;
ALTER INDEX interactions_version_time RENAME TO interactions_unpartitioned_version_time;
ALTER TABLE feedback RENAME TO feedback_unpartitioned;
ALTER INDEX feedback_interaction RENAME TO feedback_unpartitioned_interaction;
ALTER INDEX feedback_stored RENAME TO feedback_unpartitioned_stored;

CREATE TABLE interactions (LIKE interactions_unpartitioned INCLUDING DEFAULTS)
    PARTITION BY RANGE (stored_at);
ALTER TABLE interactions ADD PRIMARY KEY (event_id, stored_at);
CREATE INDEX interactions_interaction ON interactions (interaction_id);
CREATE INDEX interactions_route_time ON interactions (route, finished_at);
CREATE INDEX interactions_version_time ON interactions (model_version, finished_at);
CREATE TABLE interactions_default PARTITION OF interactions DEFAULT;

CREATE TABLE feedback (LIKE feedback_unpartitioned INCLUDING DEFAULTS)
    PARTITION BY RANGE (stored_at);
ALTER TABLE feedback ADD PRIMARY KEY (event_id, stored_at);
CREATE INDEX feedback_interaction ON feedback (interaction_id);
CREATE INDEX feedback_stored ON feedback (stored_at);
CREATE TABLE feedback_default PARTITION OF feedback DEFAULT;

-- Rows stored before this migration keep everything up to today in one partition.
CREATE TABLE interactions_history PARTITION OF interactions
    FOR VALUES FROM (MINVALUE) TO (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');
CREATE TABLE feedback_history PARTITION OF feedback
    FOR VALUES FROM (MINVALUE) TO (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');

CREATE FUNCTION ensure_event_partitions(days_ahead integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    parent text;
    day date;
    part_name text;
    created integer := 0;
BEGIN
    -- Serializes concurrent callers (several collectors starting at once).
    PERFORM pg_advisory_xact_lock(hashtext('flywheel.event_partitions'));
    FOREACH parent IN ARRAY ARRAY['interactions', 'feedback'] LOOP
        FOR ahead IN 0..days_ahead LOOP
            day := (now() AT TIME ZONE 'UTC')::date + ahead;
            part_name := format('%s_p%s', parent, to_char(day, 'YYYYMMDD'));
            CONTINUE WHEN to_regclass(part_name) IS NOT NULL;
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    part_name, parent,
                    day::timestamp AT TIME ZONE 'UTC',
                    (day + 1)::timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            EXCEPTION
                -- The DEFAULT partition already holds rows of that day (partitions
                -- fell behind): they stay there, and retention still reaches them.
                WHEN check_violation THEN
                    RAISE WARNING 'partition % not created: rows of that day are in the default partition', part_name;
            END;
        END LOOP;
    END LOOP;
    RETURN created;
END;
$$;

-- Drops what was stored before the start of the UTC day `keep_days` before `at`.
CREATE FUNCTION drop_expired_event_data(keep_days integer, at timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := date_trunc('day', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        - make_interval(days => keep_days);
    part record;
    dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('flywheel.event_partitions'));
    FOR part IN
        SELECT child.relname AS name
        FROM pg_inherits
        JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
        JOIN pg_class AS parent ON parent.oid = pg_inherits.inhparent
        WHERE parent.relname IN ('interactions', 'feedback')
          AND parent.relnamespace = to_regnamespace(current_schema())
          AND child.relname ~ '_p[0-9]{8}$'
    LOOP
        -- A day partition whose whole day is older than the cutoff.
        IF (to_date(right(part.name, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                <= cutoff THEN
            EXECUTE format('DROP TABLE %I', part.name);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    DELETE FROM interactions_default WHERE stored_at < cutoff;
    DELETE FROM feedback_default WHERE stored_at < cutoff;
    DELETE FROM interactions_history WHERE stored_at < cutoff;
    DELETE FROM feedback_history WHERE stored_at < cutoff;
    -- The keys go with their rows: an event replayed after its retention is stored
    -- again (keep Kafka's retention shorter than this one).
    DELETE FROM event_keys WHERE stored_at < cutoff;
    DELETE FROM interaction_keys WHERE stored_at < cutoff;
    RETURN dropped;
END;
$$;

SELECT ensure_event_partitions(7);

INSERT INTO interactions SELECT * FROM interactions_unpartitioned;
INSERT INTO feedback SELECT * FROM feedback_unpartitioned;
INSERT INTO event_keys (event_id, stored_at)
    SELECT event_id, stored_at FROM interactions_unpartitioned
    UNION ALL
    SELECT event_id, stored_at FROM feedback_unpartitioned
    ON CONFLICT DO NOTHING;
INSERT INTO interaction_keys (interaction_id, stored_at)
    SELECT interaction_id, stored_at FROM interactions_unpartitioned;
DROP TABLE interactions_unpartitioned;
DROP TABLE feedback_unpartitioned;
