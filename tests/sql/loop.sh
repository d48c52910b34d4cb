# The analyst's loop (extension 0.2.0 on), sourced by tests/sql/run after its cluster is up (uses its q, expect_*,
# $DIR, $PORT, $DB, $MINI_Q, $ANSWER): upgrades from 0.1.0 and 0.2.0, history (failed asks, ROLLBACK, read-only transactions,
# retention, a real streaming standby), row-level security between roles, verified examples (teach, feedback, shown
# to later asks), follow-ups, refine, explain, pg_dump/pg_restore.

# hist_wait SQL: poll (up to 5 s) until SQL (a count) is non-zero: history rows are written by a background writer.
hist_wait() {
  local n
  for _ in $(seq 1 50); do
    n=$(q "$1"); [ "$n" != "0" ] && [ -n "$n" ] && { echo "$n"; return 0; }
    sleep 0.1
  done
  echo "$n"; return 1
}

# --- upgrades: a used 0.1.0 / 0.2.0 database, updated, equals a fresh install of this version ------------------------------
# Every catalog object the extension owns, described so that two databases can be compared: functions with their
# signatures, results, strictness, volatility, parallel safety, symbol and privileges; tables with columns,
# defaults, constraints, indexes, RLS, policies, grants and comments; sequences; the dump configuration.
CATALOG_SQL="SELECT string_agg(x, E'\n' ORDER BY x) FROM (
  SELECT CASE d.classid
    WHEN 'pg_proc'::regclass THEN (SELECT format('function %s owner=%s acl=%s comment=%s: %s', p.oid::regprocedure,
        p.proowner::regrole, p.proacl, obj_description(p.oid, 'pg_proc'), pg_get_functiondef(p.oid))
        FROM pg_proc p WHERE p.oid = d.objid)
    WHEN 'pg_class'::regclass THEN (SELECT format('relation %s kind=%s owner=%s rls=%s force=%s acl=%s comment=%s columns=%s',
        c.oid::regclass, c.relkind, c.relowner::regrole, c.relrowsecurity, c.relforcerowsecurity, c.relacl,
        obj_description(c.oid, 'pg_class'),
        (SELECT string_agg(format('%s %s notnull=%s default=%s acl=%s', a.attname, format_type(a.atttypid, a.atttypmod),
                 a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), a.attacl), '; ' ORDER BY a.attnum)
         FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)) FROM pg_class c WHERE c.oid = d.objid)
    ELSE pg_describe_object(d.classid, d.objid, d.objsubid) END AS x
  FROM pg_depend d WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
    AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'copilot')
  UNION ALL SELECT format('policy %s on %s cmd=%s permissive=%s roles=%s using=%s check=%s', polname, polrelid::regclass,
      polcmd, polpermissive, polroles, pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid))
    FROM pg_policy WHERE polrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'copilot'::regnamespace)
  UNION ALL SELECT format('constraint %s on %s: %s', conname, conrelid::regclass, pg_get_constraintdef(oid))
    FROM pg_constraint WHERE connamespace = 'copilot'::regnamespace
  UNION ALL SELECT format('index %s', pg_get_indexdef(indexrelid))
    FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'copilot'::regnamespace)
  UNION ALL SELECT format('sequence %s %s', seqrelid::regclass, row(seqtypid, seqstart, seqincrement, seqmax, seqmin, seqcache, seqcycle))
    FROM pg_sequence WHERE seqrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'copilot'::regnamespace)
  UNION ALL SELECT format('extension version=%s config=%s', extversion,
      (SELECT string_agg(c::regclass::text || coalesce(' where ' || nullif(cond, ''), ''), ', ' ORDER BY c::regclass::text)
       FROM unnest(extconfig, extcondition) AS u(c, cond)))
    FROM pg_extension WHERE extname = 'copilot'
) s"
CURRENT=$(q "SELECT default_version FROM pg_available_extensions WHERE name = 'copilot'")
pg "$DIR" "$PORT" postgres -c "CREATE DATABASE fresh" >/dev/null
pg "$DIR" "$PORT" fresh -c "CREATE EXTENSION copilot" >/dev/null
cat_fresh=$(pg "$DIR" "$PORT" fresh -At -c "$CATALOG_SQL" 2>&1)
# Every released version: a database created with it (and used) keeps working with this library before its
# update — ask and, from 0.2.0, context() and history — and after ALTER EXTENSION UPDATE its catalog equals a fresh
# install's and it asks and records history.
for OLD in 0.1.0 0.2.0; do
  pg "$DIR" "$PORT" postgres -c "CREATE DATABASE upgraded" >/dev/null
  since_02=""; [ "$OLD" != 0.1.0 ] && since_02="SELECT length(copilot.context()) > 0"
  old=$(pg "$DIR" "$PORT" upgraded -At -v ON_ERROR_STOP=1 -c "CREATE EXTENSION copilot VERSION '$OLD'" \
    -c "CREATE SCHEMA mini; CREATE TABLE mini.singer (singer_id integer PRIMARY KEY, name text, country text, age integer)" \
    -c "SET search_path = mini" -c "SELECT copilot.ask('$MINI_Q')" -c "SELECT count(*) FROM copilot.last_ask()" \
    ${since_02:+-c "$since_02"} -c "SELECT extversion FROM pg_extension WHERE extname = 'copilot'" 2>&1)
  if grep -q "^$OLD$" <<<"$old" && grep -q "^SELECT" <<<"$old" && { [ -z "$since_02" ] || grep -q "^t$" <<<"$old"; }; then
    ok "a $OLD database works with the $CURRENT library before its update"
  else
    not_ok "a $OLD database works with the $CURRENT library before its update" "$old"
  fi
  out=$(pg "$DIR" "$PORT" upgraded -At -v ON_ERROR_STOP=1 -c "ALTER EXTENSION copilot UPDATE" \
    -c "SELECT extversion FROM pg_extension WHERE extname = 'copilot'" 2>&1)
  if [ "$out" = "$CURRENT" ]; then ok "ALTER EXTENSION copilot UPDATE: $OLD -> $CURRENT"; else not_ok "ALTER EXTENSION copilot UPDATE: $OLD -> $CURRENT" "$out"; fi
  cat_up=$(pg "$DIR" "$PORT" upgraded -At -c "$CATALOG_SQL" 2>&1)
  if [ "$cat_up" = "$cat_fresh" ] && [ "$(grep -c . <<<"$cat_fresh")" -gt 20 ]; then
    ok "a $OLD database updated equals a fresh $CURRENT install ($(grep -c . <<<"$cat_fresh") catalog lines)"
  else
    not_ok "a $OLD database updated equals a fresh $CURRENT install" "$(diff <(echo "$cat_up") <(echo "$cat_fresh"))"
  fi
  out=$(pg "$DIR" "$PORT" upgraded -At -c "SET search_path = mini" -c "SELECT copilot.ask('$MINI_Q')" \
    -c "SELECT history_id IS NOT NULL FROM copilot.last_ask()" -c "SELECT copilot.context('$MINI_Q') LIKE 'CREATE TABLE singer%'" 2>&1)
  if [ "$(grep -c "^t$" <<<"$out")" = 2 ] && grep -q "^SELECT" <<<"$out"; then
    ok "a $OLD database updated asks, records history and shows context(question)"
  else
    not_ok "a $OLD database updated asks, records history and shows context(question)" "$out"
  fi
  pg "$DIR" "$PORT" postgres -c "DROP DATABASE upgraded" >/dev/null
done
pg "$DIR" "$PORT" postgres -c "DROP DATABASE fresh" >/dev/null

# --- history ----------------------------------------------------------------------------------------------------
start=$(q "SELECT coalesce(max(id), 0) FROM copilot.history")
q "CREATE ROLE alice; CREATE ROLE bob; CREATE ROLE carol; GRANT copilot_admin TO carol;
   GRANT USAGE ON SCHEMA copilot, mini TO alice, bob, carol; GRANT SELECT ON mini.singer TO alice, carol;
   CREATE SCHEMA bobs; CREATE TABLE bobs.pet (id int PRIMARY KEY, name text, kind text); INSERT INTO bobs.pet VALUES (1, 'Rex', 'dog');
   GRANT USAGE ON SCHEMA bobs TO bob; GRANT SELECT ON bobs.pet TO bob;" >/dev/null
out=$(q "SET ROLE alice; SET search_path = mini; SELECT copilot.ask('$MINI_Q');
         SELECT h.role || '|' || h.kind || '|' || h.outcome || '|' || (h.sql IS NOT NULL) || '|' || h.candidates || '|' || (h.latency_ms > 0)
         FROM copilot.history h WHERE h.id = (SELECT history_id FROM copilot.last_ask())")
if grep -q "^alice|ask|00000|true|1|true$" <<<"$out"; then ok "an answered ask is recorded: role, kind, outcome, SQL, candidates, latency"; else not_ok "an answered ask is recorded" "$out"; fi
alice_id=$(q "SET ROLE alice; SELECT max(id) FROM copilot.history" | tail -1)
n=$(q "SELECT count(*) FROM copilot.history WHERE id > $start")
if [ "$n" = 1 ]; then ok "one ask, one history row"; else not_ok "one ask, one history row" "$n rows"; fi
# A failed ask inside a transaction block: its ERROR rolls the transaction back, the record survives.
q "SET ROLE alice; BEGIN; SET LOCAL search_path = nothing_here; SELECT copilot.ask('how many singers?'); COMMIT;" >/dev/null
n=$(hist_wait "SET ROLE alice; SELECT count(*) FROM copilot.history WHERE id > $start AND outcome = '42P01' AND question = 'how many singers?'" | tail -1)
if [ "$n" = 1 ]; then ok "a failed ask is recorded although its transaction rolled back (outcome 42P01)"; else not_ok "a failed ask is recorded although its transaction rolled back" "count=$n"; fi
expect_state "an ask cut by statement_timeout: 57014" 57014 "SET ROLE alice; SET search_path = mini; SET statement_timeout = '40ms'; SELECT copilot.ask('How old is the oldest singer?')"
n=$(hist_wait "SET ROLE alice; SELECT count(*) FROM copilot.history WHERE id > $start AND outcome = '57014' AND question = 'How old is the oldest singer?'" | tail -1)
if [ "$n" = 1 ]; then ok "an ask PostgreSQL itself cancelled (statement_timeout) is recorded"; else not_ok "an ask PostgreSQL itself cancelled is recorded" "count=$n"; fi
q "SET ROLE alice; BEGIN; SET LOCAL search_path = mini; SELECT copilot.ask('$MINI_Q other'); ROLLBACK;" >/dev/null
n=$(hist_wait "SET ROLE alice; SELECT count(*) FROM copilot.history WHERE id > $start AND question = '$MINI_Q other'" | tail -1)
if [ "$n" = 1 ]; then ok "ROLLBACK of the asking transaction keeps its history row"; else not_ok "ROLLBACK of the asking transaction keeps its history row" "count=$n"; fi
out=$(q "SET ROLE alice; BEGIN READ ONLY; SET LOCAL search_path = mini; SELECT copilot.ask('$MINI_Q'); COMMIT;")
n=$(hist_wait "SET ROLE alice; SELECT count(*) FROM copilot.history WHERE id > $alice_id AND question = '$MINI_Q'" | tail -1)
if grep -q "^SELECT" <<<"$out" && [ "$n" -ge 1 ]; then ok "asking in a read-only transaction works (and is recorded by the writer)"; else not_ok "asking in a read-only transaction works" "$out / count=$n"; fi
q "SET ROLE bob; SET search_path = bobs; SELECT copilot.ask('How many pets are there?')" >/dev/null 2>&1
hist_wait "SELECT count(*) FROM copilot.history WHERE role = 'bob'" >/dev/null
out=$(q "SET ROLE alice; SELECT string_agg(DISTINCT role, ',') FROM copilot.history")
if [ "$out" = alice ]; then ok "RLS: alice sees only her history"; else not_ok "RLS: alice sees only her history" "$out"; fi
out=$(q "SET ROLE bob; SELECT string_agg(DISTINCT role, ',') FROM copilot.history")
if [ "$out" = bob ]; then ok "RLS: bob sees only his history"; else not_ok "RLS: bob sees only his history" "$out"; fi
out=$(q "SET ROLE carol; SELECT string_agg(DISTINCT role, ',' ORDER BY role) FROM copilot.history WHERE role IN ('alice', 'bob')")
if [ "$out" = "alice,bob" ]; then ok "RLS: a copilot_admin member sees every role's history"; else not_ok "RLS: a copilot_admin member sees every role's history" "$out"; fi
expect_state "history cannot be updated directly" 42501 "SET ROLE alice; UPDATE copilot.history SET feedback = true"
expect_state "history cannot be written directly" 42501 "SET ROLE alice; INSERT INTO copilot.history (role, kind, question, outcome) VALUES ('bob', 'ask', 'x', '00000')"
# Retention: a row older than copilot.history_days goes when the writer next runs in this database.
q "INSERT INTO copilot.history (at, role, kind, question, outcome) VALUES (now() - interval '400 days', 'alice', 'ask', 'ancient', '00000')" >/dev/null
sleep 1.5  # the last writer has exited: the next one starts, and applies the retention
q "SET search_path = mini; SELECT copilot.ask('$MINI_Q')" >/dev/null
sleep 0.5
gone=$(hist_wait "SELECT (count(*) = 0)::int FROM copilot.history WHERE question = 'ancient'" | tail -1)
if [ "$gone" = 1 ]; then ok "copilot.history_days removes old rows"; else not_ok "copilot.history_days removes old rows" "still there"; fi

# --- verified examples ------------------------------------------------------------------------------------------
TEACH_Q="Which singers come from France?"
TEACH_SQL="SELECT name FROM singer WHERE country = 'France'"
ex=$(q "SET ROLE alice; SET search_path = mini; SELECT copilot.teach('$TEACH_Q', \$\$${TEACH_SQL}\$\$)" | tail -1)
if [[ "$ex" =~ ^[0-9]+$ ]]; then ok "teach stores a verified example (id $ex)"; else not_ok "teach stores a verified example" "$ex"; fi
expect_out "the example is filed under the table it reads, schema-qualified" "^\{mini.singer\}$" "SELECT tables FROM copilot.examples WHERE id = ${ex:-0}"
expect_out "teaching the same pair again returns the same example" "^${ex:-x}$" "SET ROLE alice; SET search_path = mini; SELECT copilot.teach('$TEACH_Q', \$\$${TEACH_SQL}\$\$)"
expect_state "teach refuses SQL that does not plan (42703, nothing stored)" 42703 "SET ROLE alice; SET search_path = mini; SELECT copilot.teach('q', 'SELECT nope FROM singer')"
expect_state "teach refuses a data-modifying statement (25006)" 25006 "SET ROLE alice; SET search_path = mini; SELECT copilot.teach('q', 'DELETE FROM singer')"
expect_state "teach refuses SQL over a table the role cannot read (42501)" 42501 "SET ROLE bob; SET search_path = mini; SELECT copilot.teach('q', 'SELECT name FROM mini.singer')"
expect_state "teach refuses an empty question (22023)" 22023 "SET ROLE alice; SELECT copilot.teach('  ', 'SELECT 1')"
expect_state "teach in a read-only transaction: 25006" 25006 "SET ROLE alice; SET search_path = mini; BEGIN READ ONLY; SELECT copilot.teach('q', 'SELECT name FROM singer')"
expect_state "teach refuses SQL that reads no table (0A000)" 0A000 "SET ROLE alice; SELECT copilot.teach('one', 'SELECT 1')"
expect_state "teach refuses a temporary table (0A000)" 0A000 "SET ROLE alice; CREATE TEMP TABLE tmp_t (a int); SELECT copilot.teach('q', 'SELECT a FROM tmp_t')"
expect_out "nothing was stored by the refusals" "^1$" "SELECT count(*) FROM copilot.examples"
out=$(q "SET ROLE bob; SELECT count(*) FROM copilot.examples")
if [ "$out" = 0 ]; then ok "RLS: bob, who cannot read mini.singer, does not see the example"; else not_ok "RLS: bob does not see the example" "$out"; fi
# An example over a schema bob may not even use must hide, not break bob's reads of copilot.examples.
q "CREATE SCHEMA alice_priv; CREATE TABLE alice_priv.notes (id int PRIMARY KEY, body text);
   GRANT USAGE ON SCHEMA alice_priv TO alice; GRANT SELECT ON alice_priv.notes TO alice;" >/dev/null
expect_out "teach over a private schema" "^[0-9]+$" "SET ROLE alice; SELECT copilot.teach('How many notes are there?', 'SELECT count(*) FROM alice_priv.notes')"
expect_out "RLS: an example in a schema bob cannot use hides without an error" "^0$" "SET ROLE bob; SELECT count(*) FROM copilot.examples"
expect_out "bob's asks still work beside it" "^(SELECT|$)" "SET ROLE bob; SET search_path = bobs; SELECT coalesce((copilot.ask_verbose('How many pets are there?'))->>'sql', '')"
q "DELETE FROM copilot.examples WHERE 'alice_priv.notes' = ANY (tables); DROP SCHEMA alice_priv CASCADE" >/dev/null
q "SET ROLE bob; DELETE FROM copilot.examples" >/dev/null
expect_out "RLS: bob cannot delete alice's example" "^1$" "SELECT count(*) FROM copilot.examples"
expect_state "no role inserts examples directly, only teach/feedback (42501)" 42501 "SET ROLE alice; INSERT INTO copilot.examples (role, question, sql, tables, source) VALUES ('bob', 'x', 'SELECT 1', '{}', 'teach')"
# examples_of ROLE SETTINGS QUESTION: ask (answered or refused), then the examples its history row says were shown.
examples_of() {
  q "SET ROLE $1; $2; SELECT copilot.ask('$3')" >/dev/null 2>&1
  q "SELECT examples FROM copilot.history WHERE role = '$1' AND question = '$3' ORDER BY id DESC LIMIT 1"
}
out=$(examples_of alice "SET search_path = mini" "Which singers come from the Netherlands?")
if grep -q "^{${ex:-x}}$" <<<"$out"; then ok "a later, similar question is shown the verified example"; else not_ok "a later, similar question is shown the verified example" "$out"; fi
out=$(examples_of alice "SET search_path = mini; SET copilot.examples = 0" "Which singers come from the Netherlands?")
if grep -q "^{}$" <<<"$out"; then ok "copilot.examples = 0 shows none"; else not_ok "copilot.examples = 0 shows none" "$out"; fi
out=$(examples_of carol "SET search_path = mini" "How many pets are there?")
if grep -q "^{}$" <<<"$out"; then ok "an unrelated question is shown no example"; else not_ok "an unrelated question is shown no example" "$out"; fi
# Feedback: wrong, with a correction -> the correction becomes an example; correct -> the answer does.
fid=$(q "SET ROLE alice; SELECT max(id) FROM copilot.history WHERE outcome = '00000' AND kind = 'ask'" | tail -1)
fex=$(q "SET ROLE alice; SET search_path = mini; SELECT copilot.feedback($fid, false, 'SELECT avg(age) FROM singer WHERE country = ''Netherlands''')" | tail -1)
out=$(q "SELECT feedback, corrected_sql IS NOT NULL, (SELECT source || ':' || history_id FROM copilot.examples WHERE id = ${fex:-0}) FROM copilot.history WHERE id = $fid")
if [ "$out" = "f|t|feedback:$fid" ]; then ok "feedback with a correction marks the row and stores the correction"; else not_ok "feedback with a correction" "$fex / $out"; fi
expect_state "feedback on another role's history: 42501" 42501 "SET ROLE carol; SELECT copilot.feedback($fid, true)"
expect_state "feedback on history the role cannot see: 22023" 22023 "SET ROLE bob; SELECT copilot.feedback($fid, true)"
expect_state "feedback on a missing row: 22023" 22023 "SELECT copilot.feedback(987654321, true)"
expect_state "feedback with a correction that does not plan: 42P01, nothing marked" 42P01 "SET ROLE alice; SET search_path = mini; SELECT copilot.feedback($fid, true, 'SELECT * FROM nowhere')"
expect_out "feedback(wrong) without a correction stores nothing, returns NULL" "^$" "SET ROLE alice; SELECT copilot.feedback($fid, false)"

# --- follow-ups, refine -------------------------------------------------------------------------------------------
t1=$(q "SET ROLE alice; SET search_path = mini; SELECT copilot.ask('$MINI_Q'); SELECT history_id FROM copilot.last_ask()" | tail -1)
out=$(q "SET ROLE alice; SET search_path = mini; SELECT copilot.ask('and only those from France?', follow_up => $t1)" 2>&1)
t2=$(hist_wait "SET ROLE alice; SELECT max(id) FROM copilot.history WHERE follow_up = $t1" | tail -1)
out3=$(q "SET ROLE alice; SET search_path = mini; SELECT copilot.ask('now sort them by age', follow_up => $t2)" 2>&1)
t3=$(hist_wait "SET ROLE alice; SELECT count(*) FROM copilot.history WHERE follow_up = $t2" | tail -1)
if [[ "$t2" =~ ^[0-9]+$ ]] && [ "$t3" = 1 ]; then ok "a three-turn conversation is recorded as a chain of follow-ups"; else not_ok "a three-turn conversation" "$out / $out3 / t2=$t2 t3=$t3"; fi
out=$(q "SET ROLE alice; SET client_min_messages = notice; SELECT coalesce(copilot.feedback($t2, true)::text, 'none')" 2>&1)
if grep -q "continues a conversation" <<<"$out" && grep -q "^none$" <<<"$out"; then ok "feedback on a follow-up marks it, stores no example, and says why"; else not_ok "feedback on a follow-up" "$out"; fi
expect_state "a follow-up of a row the role cannot see: 22023" 22023 "SET ROLE bob; SET search_path = bobs; SELECT copilot.ask('and dogs?', follow_up => $t1)"
expect_state "a follow-up of an ask that failed: 22023" 22023 "SET ROLE alice; SET search_path = mini; SELECT copilot.ask('and more?', follow_up => (SELECT max(id) FROM copilot.history WHERE outcome = '42P01'))"
expect_out "ask(NULL) is NULL" "^$" "SELECT copilot.ask(NULL)"
expect_out "teach(NULL, …) is NULL, nothing stored" "^$" "SELECT copilot.teach(NULL, 'SELECT 1')"
expect_state "feedback(NULL, …): 22004" 22004 "SELECT copilot.feedback(NULL, true)"
expect_state "feedback(…, NULL): 22004" 22004 "SELECT copilot.feedback(1, NULL)"
expect_state "refine of two statements: 25006" 25006 "SET search_path = mini; SELECT copilot.refine('SELECT 1; SELECT 2', 'more')"
expect_state "a follow-up of a negative id: 22023" 22023 "SET search_path = mini; SELECT copilot.ask('and?', follow_up => -1)"
expect_state "a follow-up with an empty question: 22023, before anything else" 22023 "SELECT copilot.ask('  ', follow_up => 1)"
out=$(q "SET ROLE alice; SET search_path = mini; SELECT copilot.refine('SELECT name FROM singer', 'only those from France')" 2>&1)
n=$(hist_wait "SET ROLE alice; SELECT count(*) FROM copilot.history WHERE kind = 'refine' AND question = 'only those from France'" | tail -1)
if [ "$n" = 1 ] && { grep -q "^SELECT" <<<"$out" || grep -q "P0002" <<<"$out"; }; then ok "refine edits a query (recorded as kind refine)"; else not_ok "refine edits a query" "$out / $n"; fi
expect_state "refine refuses a data-modifying statement (25006)" 25006 "SET search_path = mini; SELECT copilot.refine('DROP TABLE singer', 'and more')"

# --- explain ------------------------------------------------------------------------------------------------------
expect_out "explain describes a query clause by clause" "France" "SELECT copilot.explain(\$\$SELECT name FROM mini.singer WHERE country = 'France' ORDER BY age DESC LIMIT 3\$\$)"
out=$(q "SELECT copilot.explain(\$\$SELECT name FROM mini.singer WHERE country = 'France'\$\$, narrative => true)")
if grep -q "^Summary (written by the model): ." <<<"$out" && grep -q "^Keeps rows where" <<<"$out" && ! grep -q '```sql' <<<"$(head -1 <<<"$out")"; then
  ok "explain(narrative => true) adds the model's summary, in words, before the clauses"
else
  not_ok "explain(narrative => true) adds the model's summary" "$out"
fi
expect_state "explain: not SQL -> 42601" 42601 "SELECT copilot.explain('SELEC name FRM')"
expect_state "explain: not a query -> 0A000" 0A000 "SELECT copilot.explain('DELETE FROM mini.singer')"
expect_state "explain: deep nesting refused" 42601 "SELECT copilot.explain(repeat('(', 5000))"

# --- pg_dump / pg_restore carry history and examples ----------------------------------------------------------------
dump="$DIR/dump.pgc"   # the cluster directory is postgres's; /tmp need not be writable by it
counts="SELECT (SELECT count(*) FROM copilot.history) || '/' || (SELECT count(*) FROM copilot.examples)"
before=$(q "$counts"); maxex=$(q "SELECT max(id) FROM copilot.examples")
if runuser -u postgres -- pg_dump -h "$DIR" -p "$PORT" -Fc -f "$dump" "$DB" 2>/tmp/copilot-dump.log \
   && pg "$DIR" "$PORT" postgres -c "CREATE DATABASE restored" >/dev/null \
   && runuser -u postgres -- pg_restore -h "$DIR" -p "$PORT" -d restored "$dump" 2>>/tmp/copilot-dump.log; then
  after=$(pg "$DIR" "$PORT" restored -At -c "$counts" 2>&1)
  nextid=$(pg "$DIR" "$PORT" restored -At -c "SET search_path = mini" -c "SELECT copilot.teach('How old is Joe?', \$\$SELECT age FROM singer WHERE name = 'Joe'\$\$)" 2>&1)
  if [ "$before" = "$after" ] && [[ "$nextid" =~ ^[0-9]+$ ]] && [ "$nextid" -gt "$maxex" ]; then
    ok "pg_dump/pg_restore carry history and examples ($after), their sequences continue"
  else
    not_ok "pg_dump/pg_restore carry history and examples" "before $before, after $after, next id $nextid after $maxex"
  fi
else
  not_ok "pg_dump/pg_restore carry history and examples" "$(cat /tmp/copilot-dump.log)"
fi
pg "$DIR" "$PORT" postgres -c "DROP DATABASE IF EXISTS restored" >/dev/null
rm -f "$dump"

# --- a hot standby: asking works, nothing is recorded, nothing fails ------------------------------------------------
SB="$DIR-standby"; SBPORT=$((PORT + 2))
stop_cluster "$SB"; rm -rf "$SB"; mkdir -p "$SB"; chown postgres:postgres "$SB"
if runuser -u postgres -- pg_basebackup -h "$DIR" -p "$PORT" -D "$SB/data" -R -X stream 2>/tmp/copilot-basebackup.log; then
  printf "port = %s\nunix_socket_directories = '%s'\n" "$SBPORT" "$SB" >> "$SB/data/postgresql.conf"
  server_start "$SB"
  wait_ready "$SB" "$SBPORT" "$DB" 60 >/dev/null 2>&1
  before=$(pg "$SB" "$SBPORT" "$DB" -At -c "SELECT count(*) FROM copilot.history" 2>&1)
  out=$(pg "$SB" "$SBPORT" "$DB" -At -c '\set VERBOSITY verbose' -c "SELECT pg_is_in_recovery()" -c "SET search_path = mini" \
        -c "SELECT copilot.ask('$MINI_Q')" -c "SELECT history_id IS NULL FROM copilot.last_ask()" 2>&1)
  sleep 1
  after=$(pg "$SB" "$SBPORT" "$DB" -At -c "SELECT count(*) FROM copilot.history" 2>&1)
  if grep -q "^t$" <<<"$(head -1 <<<"$out")" && grep -q "^SELECT" <<<"$out" && [ "$(tail -1 <<<"$out")" = t ] && [ "$before" = "$after" ]; then
    ok "a streaming standby answers; history is skipped there"
  else
    not_ok "a streaming standby answers; history is skipped there" "$out / history $before -> $after / $(tail -5 "$SB/server.log")"
  fi
  expect_sb=$(pg "$SB" "$SBPORT" "$DB" -At -c '\set VERBOSITY verbose' -c "SET search_path = mini" -c "SELECT copilot.teach('x', 'SELECT 1 FROM singer')" 2>&1)
  if grep -q "ERROR:  25006" <<<"$expect_sb"; then ok "teach on a standby: 25006, clear"; else not_ok "teach on a standby: 25006" "$expect_sb"; fi
  stop_cluster "$SB"
else
  not_ok "a streaming standby answers; history is skipped there" "$(cat /tmp/copilot-basebackup.log)"
fi
rm -rf "$SB"
q "RESET ROLE; DROP SCHEMA bobs CASCADE; REVOKE ALL ON SCHEMA copilot, mini FROM alice, bob, carol; REVOKE SELECT ON mini.singer FROM alice, carol;
   DELETE FROM copilot.examples; DROP OWNED BY alice, bob, carol; DROP ROLE alice, bob, carol" >/dev/null
