-- Encryption at rest for message content (services/common/sealing.py). A row whose
-- `content_key_id` is set holds its content only in the `*_sealed` columns (nonce ||
-- AES-256-GCM ciphertext), its plaintext content columns NULL; a row without one is
-- plaintext, as every row stored before this migration. `flywheel db rotate-key`
-- re-seals rows to the active key.
--
-- Numbered after 0010 so that it runs last on a fresh schema too. The CHECK
-- constraints read every stored row once (on the parent, so on every partition).

ALTER TABLE interactions
    ADD COLUMN content_key_id text,
    ADD COLUMN request_messages_sealed bytea,
    ADD COLUMN response_text_sealed bytea;
-- A sealed row has no plaintext request to keep.
ALTER TABLE interactions ALTER COLUMN request_messages DROP NOT NULL;
ALTER TABLE interactions
    ADD CONSTRAINT interactions_content_sealed_or_plain CHECK (
        CASE WHEN content_key_id IS NULL
            THEN request_messages IS NOT NULL
                 AND request_messages_sealed IS NULL AND response_text_sealed IS NULL
            ELSE request_messages IS NULL AND response_text IS NULL
                 AND request_messages_sealed IS NOT NULL
        END
    );

ALTER TABLE feedback
    ADD COLUMN content_key_id text,
    ADD COLUMN text_sealed bytea;
ALTER TABLE feedback
    ADD CONSTRAINT feedback_content_sealed_or_plain CHECK (
        CASE WHEN content_key_id IS NULL
            THEN text_sealed IS NULL
            ELSE text IS NULL
        END
    );
