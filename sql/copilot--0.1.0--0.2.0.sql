-- copilot 0.1.0 -> 0.2.0: the analyst's loop.
--   copilot.history (every ask/run/refine, failed ones too; RLS: own rows, copilot_admin sees all),
--   copilot.examples (verified question -> SQL pairs; RLS: only over tables the role can read),
--   ask(question, follow_up), last_ask() with history_id, teach, feedback, refine, explain.
-- Must leave the catalog exactly as a fresh 0.2.0 install does: tests/sql/run compares the two.

DROP FUNCTION copilot.ask(text);
CREATE FUNCTION copilot."ask"(
	"question" TEXT,
	"follow_up" bigint DEFAULT NULL
) RETURNS TEXT
PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ask_follow_up_wrapper';

DROP FUNCTION copilot.last_ask();
CREATE FUNCTION copilot."last_ask"() RETURNS TABLE (
	"latency_ms" double precision,
	"prompt_tokens" INT,
	"generated_tokens" INT,
	"decode_tok_s" double precision,
	"prefix_tokens" INT,
	"prefix_cache_hit" bool,
	"history_id" bigint
)
STRICT PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'last_ask_with_history_wrapper';

CREATE FUNCTION copilot."teach"(
	"question" TEXT,
	"sql" TEXT
) RETURNS bigint
STRICT PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'teach_wrapper';

CREATE FUNCTION copilot."feedback"(
	"history_id" bigint,
	"correct" bool,
	"corrected_sql" TEXT DEFAULT NULL
) RETURNS bigint
PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'feedback_wrapper';

CREATE FUNCTION copilot."refine"(
	"sql" TEXT,
	"instruction" TEXT
) RETURNS TEXT
STRICT PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'refine_wrapper';

CREATE FUNCTION copilot."explain"(
	"sql" TEXT,
	"narrative" bool DEFAULT false
) RETURNS TEXT
STRICT PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'explain_wrapper';

-- Members of copilot_admin see every role's history and may delete any example.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'copilot_admin') THEN
        CREATE ROLE copilot_admin NOLOGIN;
    END IF;
END
$$;

CREATE TABLE copilot.history (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    role name NOT NULL,
    database name NOT NULL DEFAULT current_database(),
    kind text NOT NULL CHECK (kind IN ('ask', 'run', 'refine')),
    question text NOT NULL,
    follow_up bigint,
    schema_fingerprint text,
    sql text,
    outcome text NOT NULL,
    message text,
    candidates integer,
    repairs integer,
    examples bigint[],
    latency_ms double precision,
    rows_returned bigint,
    feedback boolean,
    corrected_sql text
);
CREATE INDEX history_role_at ON copilot.history (role, at);
CREATE INDEX history_at ON copilot.history (at);
COMMENT ON TABLE copilot.history IS
    'Every copilot.ask / copilot.run / copilot.refine: one row each, failed ones too (outcome is the SQLSTATE, 00000 when answered). Each role sees its own rows; copilot_admin sees all.';

CREATE TABLE copilot.examples (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    role name NOT NULL DEFAULT current_user,
    question text NOT NULL CHECK (btrim(question) <> ''),
    sql text NOT NULL CHECK (btrim(sql) <> ''),
    tables text[] NOT NULL CHECK (cardinality(tables) > 0),
    source text NOT NULL CHECK (source IN ('teach', 'feedback')),
    history_id bigint
);
COMMENT ON TABLE copilot.examples IS
    'Verified question -> SQL pairs (copilot.teach, copilot.feedback), shown to the model with similar questions. A role sees an example only when it can read every table in "tables".';

-- Whether the current role may use the schema of, and SELECT from, every table in `tables` (schema-qualified
-- names as format('%I.%I') writes them); a table that no longer exists hides the example. Looked up in the catalog
-- by name, never through to_regclass, which raises for a schema the role may not use.
CREATE FUNCTION copilot.readable(tables text[]) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (SELECT coalesce(pg_catalog.bool_and(c.oid IS NOT NULL
                       AND pg_catalog.has_schema_privilege(c.relnamespace, 'USAGE')
                       AND pg_catalog.has_table_privilege(c.oid, 'SELECT')), false)
            FROM pg_catalog.unnest(tables) AS t(name)
            LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = (pg_catalog.parse_ident(t.name))[1]
            LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid
                                            AND c.relname = (pg_catalog.parse_ident(t.name))[2]);

ALTER TABLE copilot.history ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON copilot.history FOR SELECT
    USING (role = current_user OR pg_has_role(current_user, 'copilot_admin', 'MEMBER'));
-- Rows are written only by the history writer and, for feedback, by copilot.feedback acting as the table's owner
-- after its checks: no role needs INSERT or UPDATE.
GRANT SELECT ON copilot.history TO PUBLIC;

ALTER TABLE copilot.examples ENABLE ROW LEVEL SECURITY;
CREATE POLICY readable ON copilot.examples FOR SELECT
    USING (copilot.readable(tables));
CREATE POLICY own_or_admin ON copilot.examples FOR DELETE
    USING (role = current_user OR pg_has_role(current_user, 'copilot_admin', 'MEMBER'));
-- Examples are stored only by copilot.teach / copilot.feedback, acting as the table's owner after checking the SQL
-- as the caller (gate, plan, the tables it reads): no role needs INSERT.
GRANT SELECT, DELETE ON copilot.examples TO PUBLIC;

-- pg_dump / pg_restore carry the rows (and the sequences' positions) of both tables.
SELECT pg_catalog.pg_extension_config_dump('copilot.history', '');
SELECT pg_catalog.pg_extension_config_dump('copilot.history_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('copilot.examples', '');
SELECT pg_catalog.pg_extension_config_dump('copilot.examples_id_seq', '');
