-- Flywheel's tables. Applied by `flywheel db migrate` (and on start-up when asked)
-- inside the configured schema; the migration runner records each file it applied.

CREATE TABLE interactions (
    event_id            uuid PRIMARY KEY,
    interaction_id      uuid NOT NULL UNIQUE,
    project_id          text NOT NULL,
    session_id          text,
    user_id             text,
    route               text NOT NULL,
    variant             text NOT NULL,
    model_version       text,
    upstream_model      text,
    experiment_id       text,
    arm                 text,
    request_messages    jsonb NOT NULL,
    request_params      jsonb NOT NULL DEFAULT '{}',
    response_text       text,
    finish_reason       text,
    error               jsonb,
    prompt_tokens       integer NOT NULL DEFAULT 0,
    completion_tokens   integer NOT NULL DEFAULT 0,
    cost_usd            double precision NOT NULL DEFAULT 0,
    latency_s           double precision NOT NULL,
    ttft_s              double precision,
    stream              boolean NOT NULL DEFAULT false,
    metadata            jsonb NOT NULL DEFAULT '{}',
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    stored_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX interactions_route_time ON interactions (route, finished_at);
CREATE INDEX interactions_version_time ON interactions (model_version, finished_at);

-- Feedback may arrive before its interaction (or for one that never comes), so it
-- has no foreign key; orphans are those with no matching interaction row.
CREATE TABLE feedback (
    event_id        uuid PRIMARY KEY,
    interaction_id  uuid NOT NULL,
    project_id      text NOT NULL,
    kind            text NOT NULL,
    value           double precision,
    text            text,
    user_id         text,
    created_at      timestamptz NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feedback_interaction ON feedback (interaction_id);
CREATE INDEX feedback_stored ON feedback (stored_at);

-- The model registry: every version ever trained, with its lineage.
CREATE TABLE model_versions (
    version_id      text PRIMARY KEY,
    route           text NOT NULL,
    base_model      text NOT NULL,
    adapter         text,
    upstream_url    text NOT NULL,
    parent_version  text REFERENCES model_versions (version_id),
    dataset_id      text,
    state           text NOT NULL CHECK (state IN
                        ('training', 'staged', 'rejected', 'canary', 'production',
                         'rolled_back', 'retired')),
    settings        jsonb NOT NULL DEFAULT '{}',
    scores          jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Dataset snapshots: reproducible by content hash and query window.
CREATE TABLE datasets (
    dataset_id      text PRIMARY KEY,
    route           text NOT NULL,
    content_sha256  text NOT NULL,
    window_start    timestamptz,
    window_end      timestamptz NOT NULL,
    train_rows      integer NOT NULL,
    holdout_rows    integer NOT NULL,
    dropped         jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Every training row keeps the ids of the signals it came from.
CREATE TABLE dataset_rows (
    dataset_id      text NOT NULL REFERENCES datasets (dataset_id),
    row_no          integer NOT NULL,
    split           text NOT NULL CHECK (split IN ('train', 'holdout')),
    prompt          jsonb NOT NULL,
    completion      text NOT NULL,
    source          text NOT NULL,
    interaction_id  uuid NOT NULL,
    feedback_id     uuid,
    PRIMARY KEY (dataset_id, row_no)
);

-- The routing table, versioned: the newest row is the live table.
CREATE TABLE routing_tables (
    version     bigint PRIMARY KEY,
    body        jsonb NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Rollouts and every decision taken on them.
CREATE TABLE rollouts (
    rollout_id      text PRIMARY KEY,
    route           text NOT NULL,
    candidate       text NOT NULL REFERENCES model_versions (version_id),
    baseline        text NOT NULL REFERENCES model_versions (version_id),
    steps           jsonb NOT NULL,
    step_index      integer NOT NULL DEFAULT 0,
    state           text NOT NULL CHECK (state IN
                        ('running', 'promoted', 'rolled_back')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX rollouts_one_running_per_route ON rollouts (route)
    WHERE state = 'running';

CREATE TABLE rollout_decisions (
    decision_id     bigserial PRIMARY KEY,
    rollout_id      text NOT NULL REFERENCES rollouts (rollout_id),
    action          text NOT NULL,
    source          text NOT NULL,
    reason          text NOT NULL,
    verdict         jsonb,
    routing_version bigint,
    created_at      timestamptz NOT NULL DEFAULT now()
);
