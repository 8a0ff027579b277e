-- The trainer, round 2: preference pairs in datasets, personal data masked on
-- curation, training runs (so a failed run is retried instead of skipped), per-route
-- approvals for the `approve` rollout policy.

-- A dataset row is either a supervised example (`sft`: prompt + completion) or a
-- preference pair (`preference`: prompt + preferred completion + rejected answer).
-- interaction_id / feedback_id name the preferred answer's signals; the rejected
-- answer's own ids sit beside them (the same interaction for a correction).
ALTER TABLE dataset_rows
    ADD COLUMN kind text NOT NULL DEFAULT 'sft' CHECK (kind IN ('sft', 'preference')),
    ADD COLUMN rejected text,
    ADD COLUMN rejected_interaction_id uuid,
    ADD COLUMN rejected_feedback_id uuid,
    ADD CONSTRAINT dataset_rows_preference_has_rejected
        CHECK (kind = 'sft' OR rejected IS NOT NULL);

-- How many kept rows had personal data masked by the curation's second scan, and the
-- rows per kind and split.
ALTER TABLE datasets
    ADD COLUMN masked jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN counts jsonb NOT NULL DEFAULT '{}';

-- One row per training attempt. The scheduler's window advances only past runs that
-- finished (succeeded, skipped for too few rows, or given up after every attempt),
-- so a failed run is tried again on the same signals.
CREATE TABLE training_runs (
    run_id          text PRIMARY KEY,
    route           text NOT NULL,
    window_end      timestamptz NOT NULL,
    attempt         integer NOT NULL DEFAULT 1,
    state           text NOT NULL CHECK (state IN
                        ('running', 'succeeded', 'skipped', 'failed', 'abandoned')),
    dataset_id      text REFERENCES datasets (dataset_id),
    version_id      text REFERENCES model_versions (version_id),
    outcome         text,
    error           text,
    timings         jsonb NOT NULL DEFAULT '{}',
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX training_runs_route_time ON training_runs (route, started_at);

-- A person's approval (`flywheel approve ROUTE`) for a route under the `approve`
-- policy. The controller polls the unhandled ones and applies each to whatever waits
-- on the route (a staged candidate's first traffic, or its promotion to production);
-- an approval with nothing waiting is marked handled too, so none lingers as a
-- blanket pre-approval.
CREATE TABLE approvals (
    approval_id     bigserial PRIMARY KEY,
    route           text NOT NULL,
    version_id      text,
    approved_by     text NOT NULL,
    reason          text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    handled_at      timestamptz,
    outcome         text
);
CREATE INDEX approvals_unhandled ON approvals (route) WHERE handled_at IS NULL;

-- A running rollout whose last step the analyzer passed, waiting for a person to
-- approve its promotion to production.
ALTER TABLE rollouts
    ADD COLUMN awaiting_approval boolean NOT NULL DEFAULT false;
