-- copilot 0.2.0 -> 0.3.0: large schemas.
--   context(question text DEFAULT NULL): with a question, the tables and columns ask chooses for it when the schema
--   exceeds copilot.context_budget_tokens (what the model is shown); without one, every readable table as before.
-- Must leave the catalog exactly as a fresh 0.3.0 install does: tests/sql/run compares the two.

DROP FUNCTION copilot.context();
CREATE FUNCTION copilot."context"(
	"question" TEXT DEFAULT NULL
) RETURNS TEXT
PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'context_question_wrapper';
