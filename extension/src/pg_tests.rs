//! In-database tests, run by `cargo pgrx test pg15` in a throwaway cluster that preloads copilot with the tiny CI
//! model (see `pg_test::postgresql_conf_options`). Each test runs in its own transaction, rolled back after.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn demo_tables() {
        Spi::run(
            "CREATE TABLE singer (singer_id integer PRIMARY KEY, name text, country text, age integer);
             CREATE TABLE concert (concert_id integer PRIMARY KEY, concert_name text, year integer);
             CREATE TABLE singer_in_concert (concert_id integer REFERENCES concert, singer_id integer REFERENCES singer,
                                             PRIMARY KEY (concert_id, singer_id));
             INSERT INTO singer VALUES (1, 'Joe', 'France', 52), (2, 'Ann', 'Netherlands', 31);",
        )
        .unwrap();
    }

    /// One table and a question the tiny model answers with SQL that plans (greedy decoding: deterministic); an
    /// answer that does not plan would be refused (P0002) by the pipeline.
    fn answered_ask() -> String {
        Spi::run("CREATE TABLE singer (singer_id integer PRIMARY KEY, name text, country text, age integer)").unwrap();
        Spi::get_one::<String>("SELECT copilot.ask('What is the average age of singers?')").unwrap().unwrap()
    }

    fn parses(sql: &str) -> bool {
        use copilot_core::sql::extract::extract_sql;
        extract_sql(sql).as_deref() == Some(sql)
    }

    #[pg_test]
    fn ask_returns_one_parseable_statement() {
        let sql = answered_ask();
        assert!(!sql.trim().is_empty());
        assert!(parses(&sql), "not one parseable statement: {sql}");
        let status_served = Spi::get_one::<i64>("SELECT requests_served FROM copilot.status()").unwrap().unwrap();
        assert!(status_served >= 1);
    }

    #[pg_test]
    fn ask_is_strict() {
        assert_eq!(Spi::get_one::<String>("SELECT copilot.ask(NULL)").unwrap(), None);
    }

    #[pg_test(error = "copilot: the question is empty")]
    fn empty_question_is_refused() {
        demo_tables();
        Spi::run("SELECT copilot.ask('   ')").unwrap();
    }

    #[pg_test(error = "copilot: the question is 2001 characters long, more than copilot.max_question_chars (2000)")]
    fn too_long_question_is_refused() {
        demo_tables();
        Spi::run("SELECT copilot.ask(repeat('a', 2001))").unwrap();
    }

    #[pg_test(error = "copilot: no tables you can SELECT from in copilot.schemas (nothing_here)")]
    fn no_visible_tables_is_an_error() {
        Spi::run("CREATE SCHEMA nothing_here; SET LOCAL copilot.schemas = 'nothing_here'").unwrap();
        Spi::run("SELECT copilot.ask('how many rows?')").unwrap();
    }

    #[pg_test]
    fn context_shows_only_what_the_role_can_select() {
        demo_tables();
        Spi::run(
            "CREATE TABLE secret (id integer PRIMARY KEY, payload text);
             CREATE TABLE partly (id integer PRIMARY KEY, visible text, hidden text);
             CREATE ROLE copilot_reader;
             GRANT USAGE ON SCHEMA public TO copilot_reader;
             GRANT SELECT ON singer TO copilot_reader;
             GRANT SELECT (id, visible) ON partly TO copilot_reader;
             GRANT USAGE ON SCHEMA copilot TO copilot_reader;",
        )
        .unwrap();
        let all = Spi::get_one::<String>("SELECT copilot.context()").unwrap().unwrap();
        assert!(all.contains("CREATE TABLE secret (id integer, payload text, PRIMARY KEY (id));"), "{all}");
        assert!(all.contains(
            "CREATE TABLE singer_in_concert (concert_id integer, singer_id integer, PRIMARY KEY (concert_id, singer_id), \
             FOREIGN KEY (concert_id) REFERENCES concert(concert_id), FOREIGN KEY (singer_id) REFERENCES singer(singer_id));"
        ), "{all}");
        Spi::run("SET LOCAL ROLE copilot_reader").unwrap();
        let mine = Spi::get_one::<String>("SELECT copilot.context()").unwrap().unwrap();
        assert_eq!(
            mine,
            "CREATE TABLE partly (id integer, visible text, PRIMARY KEY (id));\n\
             CREATE TABLE singer (singer_id integer, name text, country text, age integer, PRIMARY KEY (singer_id));\n"
        );
    }

    /// The demo tables and 40 wide tables nobody asks about.
    fn large_schema() {
        demo_tables();
        Spi::run(
            "DO $$ BEGIN FOR i IN 1..40 LOOP
               EXECUTE format('CREATE TABLE wide_%s (%s)', lpad(i::text, 2, '0'),
                 (SELECT string_agg(format('measure_%s_%s numeric', i, c), ', ') FROM generate_series(1, 25) c));
             END LOOP; END $$;",
        )
        .unwrap();
    }

    #[pg_test]
    fn a_large_schema_shows_the_question_s_tables_and_join_path_within_the_budget() {
        large_schema();
        Spi::run("SET LOCAL copilot.context_budget_tokens = 150").unwrap();
        let (_, full) = crate::api::context_for(None).unwrap();
        assert!(full.contains("CREATE TABLE wide_40 ("), "context() still shows everything");
        let (cat, ctx) = crate::api::context_for(Some("Which singers sang in the concerts of 2014?")).unwrap();
        for t in ["CREATE TABLE singer (", "CREATE TABLE concert (", "CREATE TABLE singer_in_concert ("] {
            assert!(ctx.contains(t), "{t} missing from {ctx}");
        }
        assert!(!ctx.contains("wide_"), "{ctx}");
        assert!(ctx.len().div_ceil(3) <= 150, "{} estimated tokens", ctx.len().div_ceil(3));
        assert_eq!(cat.tables.len(), 3);
        // The same question sees the same context.
        assert_eq!(crate::api::context_for(Some("Which singers sang in the concerts of 2014?")).unwrap().1, ctx);
    }

    #[pg_test]
    fn below_the_budget_the_question_s_context_is_the_whole_schema() {
        demo_tables();
        let (_, full) = crate::api::context_for(None).unwrap();
        let (_, asked) = crate::api::context_for(Some("How many singers are there?")).unwrap();
        assert_eq!(asked, full);
    }

    #[pg_test]
    fn exclude_tables_hides_and_include_tables_keeps_a_table() {
        large_schema();
        Spi::run("SET LOCAL copilot.exclude_tables = 'concert, public.WIDE_02'").unwrap();
        let ctx = Spi::get_one::<String>("SELECT copilot.context()").unwrap().unwrap();
        assert!(!ctx.contains("CREATE TABLE concert (") && !ctx.contains("CREATE TABLE wide_02 ("), "{ctx}");
        assert!(ctx.contains("CREATE TABLE singer (") && ctx.contains("CREATE TABLE wide_03 ("));
        Spi::run("SET LOCAL copilot.context_budget_tokens = 400; SET LOCAL copilot.include_tables = 'wide_07'")
            .unwrap();
        let (_, asked) = crate::api::context_for(Some("How old is the oldest singer?")).unwrap();
        assert!(asked.contains("CREATE TABLE wide_07 (") && asked.contains("CREATE TABLE singer ("), "{asked}");
        assert!(!asked.contains("CREATE TABLE concert ("), "an excluded table stays excluded: {asked}");
    }

    #[pg_test(
        error = "copilot: not even the table this question needs most fits the context chosen for it (5 tokens: copilot.selected_context_tokens, at most copilot.context_budget_tokens)"
    )]
    fn a_budget_too_small_for_any_table_is_a_clear_error() {
        large_schema();
        Spi::run("SET LOCAL copilot.context_budget_tokens = 5").unwrap();
        Spi::run("SELECT copilot.ask('How many singers are there?')").unwrap();
    }

    #[pg_test]
    fn copilot_schemas_overrides_the_search_path() {
        Spi::run(
            "CREATE SCHEMA sales; CREATE TABLE sales.orders (id integer, amount numeric(10,2));
             CREATE TABLE public.other (x integer);
             SET LOCAL copilot.schemas = 'sales';",
        )
        .unwrap();
        let ctx = Spi::get_one::<String>("SELECT copilot.context()").unwrap().unwrap();
        assert_eq!(ctx, "CREATE TABLE sales.orders (id integer, amount numeric(10,2));\n");
    }

    #[pg_test]
    fn status_reports_a_ready_worker_and_its_model() {
        answered_ask();
        let (state, model, arch) =
            Spi::get_three::<String, String, String>("SELECT state, model, model_arch FROM copilot.status()").unwrap();
        assert_eq!(state.as_deref(), Some("ready"));
        assert!(model.unwrap().ends_with(".gguf"));
        assert_eq!(arch.as_deref(), Some("llama"));
        let pid = Spi::get_one::<i32>("SELECT worker_pid FROM copilot.status()").unwrap();
        assert!(pid.is_some_and(|p| p > 0));
    }

    /// The tiny model answers this question with a CREATE TABLE line (greedy decoding is deterministic): the
    /// extension must refuse it as "no SQL query", with what the model wrote in DETAIL.
    #[pg_test(error = "copilot: the model's answer contains no SQL query")]
    fn output_without_a_query_is_an_error() {
        demo_tables();
        Spi::run("SELECT copilot.ask('list the names of all singers')").unwrap();
    }

    fn checksum() -> String {
        Spi::get_one::<String>("SELECT md5(string_agg(s::text, ',' ORDER BY singer_id)) FROM singer s")
            .unwrap()
            .unwrap()
    }

    #[pg_test]
    fn run_sql_returns_rows_as_json_objects() {
        demo_tables();
        let rows = Spi::get_one::<pgrx::JsonB>(
            "SELECT jsonb_agg(r) FROM copilot.run_sql('SELECT name, age FROM singer ORDER BY age;') r",
        )
        .unwrap()
        .unwrap();
        assert_eq!(rows.0, serde_json::json!([{"name": "Ann", "age": 31}, {"name": "Joe", "age": 52}]));
    }

    #[pg_test]
    fn run_sql_caps_rows_at_max_rows() {
        Spi::run("SET LOCAL copilot.max_rows = 3").unwrap();
        let n =
            Spi::get_one::<i64>("SELECT count(*) FROM copilot.run_sql('SELECT * FROM generate_series(1, 1000000)')")
                .unwrap();
        assert_eq!(n, Some(3));
    }

    #[pg_test(error = "copilot: refused: only queries are allowed, found DELETE")]
    fn run_sql_refuses_dml() {
        demo_tables();
        Spi::run("SELECT * FROM copilot.run_sql('DELETE FROM singer')").unwrap();
    }

    #[pg_test(error = "copilot: refused: calling nextval() is not allowed")]
    fn run_sql_refuses_denied_functions() {
        Spi::run("CREATE SEQUENCE s; SELECT * FROM copilot.run_sql('SELECT nextval(''s'')')").unwrap();
    }

    /// Found by fuzzing the gate: nested calls made its parser backtrack for minutes, uninterruptibly.
    #[pg_test(error = "copilot: refused: the SQL nests parentheses 40 levels deep, more than the 12 allowed")]
    fn run_sql_refuses_deep_nesting_at_once() {
        Spi::run(&format!("SELECT * FROM copilot.run_sql('SELECT {}1{}')", "abs(".repeat(40), ")".repeat(40))).unwrap();
    }

    #[pg_test(error = "cannot execute INSERT in a read-only transaction")]
    fn writes_hidden_in_functions_hit_read_only() {
        demo_tables();
        Spi::run(
            "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql VOLATILE AS
               'INSERT INTO singer VALUES (99, ''X'', ''Y'', 1) RETURNING 1';",
        )
        .unwrap();
        Spi::run("SELECT * FROM copilot.run_sql('SELECT sneaky()')").unwrap();
    }

    /// A statement that overruns copilot.statement_timeout is cancelled (57014); the caller's transaction state,
    /// read/write mode and timer are as before, and nothing was written.
    #[pg_test]
    fn timeout_cancels_and_leaves_the_caller_as_it_was() {
        demo_tables();
        let before = checksum();
        Spi::run("SET LOCAL copilot.statement_timeout = 200").unwrap();
        let caught = PgTryBuilder::new(|| {
            Spi::run("SELECT * FROM copilot.run_sql('SELECT pg_sleep(5)')").unwrap();
            None
        })
        .catch_others(|e| match e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(r) | pgrx::pg_sys::panic::CaughtError::ErrorReport(r) => {
                Some((r.sql_error_code(), r.message().to_string()))
            }
            other => other.rethrow(),
        })
        .execute();
        let (code, message) = caught.expect("pg_sleep(5) must be cancelled");
        assert_eq!(code, pgrx::PgSqlErrorCode::ERRCODE_QUERY_CANCELED, "{message}");
        // copilot rolled back its own subtransaction before raising, so this transaction is intact:
        let ro = Spi::get_one::<String>("SELECT current_setting('transaction_read_only')").unwrap();
        assert_eq!(ro.as_deref(), Some("off"));
        assert_eq!(checksum(), before);
        Spi::run("INSERT INTO singer VALUES (3, 'New', 'France', 40)").unwrap();
    }

    #[pg_test]
    fn success_leaves_the_caller_read_write() {
        demo_tables();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM copilot.run_sql('SELECT 1')").unwrap();
        assert_eq!(n, Some(1));
        let ro = Spi::get_one::<String>("SELECT current_setting('transaction_read_only')").unwrap();
        assert_eq!(ro.as_deref(), Some("off"));
        Spi::run("INSERT INTO singer VALUES (3, 'New', 'France', 40)").unwrap();
    }

    #[pg_test]
    fn postgres_own_parser_applies_the_gates_rules() {
        use copilot_core::sql::gate::Rejection;
        let check = crate::pg_gate::check;
        for ok in [
            "SELECT 1",
            "VALUES (1), (2)",
            "SELECT 1 UNION SELECT 2",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
            "SELECT * FROM generate_series(1, 3)",
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'pg_%'",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        let denied = |name: &str| Err(Rejection::DeniedFunction(name.into()));
        assert_eq!(check("SELECT 1; SELECT 2"), Err(Rejection::MultipleStatements(2)));
        assert_eq!(check("  "), Err(Rejection::Empty));
        assert!(matches!(check("DELETE FROM t"), Err(Rejection::NotAQuery(_))));
        assert_eq!(check("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x"), Err(Rejection::DataModifyingCte));
        assert_eq!(check("SELECT * FROM t FOR UPDATE"), Err(Rejection::LockingClause));
        assert_eq!(check("SELECT 1 AS a INTO newtable"), Err(Rejection::SelectInto));
        assert_eq!(check("SELECT lo_import('/etc/passwd')"), denied("lo_import"));
        assert_eq!(check("SELECT (SELECT PG_CATALOG.Pg_Read_File('x'))"), denied("pg_read_file"));
        assert_eq!(check("SELECT * FROM pg_ls_dir('.')"), denied("pg_ls_dir"));
        assert_eq!(check("SELECT 1 WHERE EXISTS (SELECT pg_terminate_backend(1))"), denied("pg_terminate_backend"));
        assert!(matches!(check("SELEC 1"), Err(Rejection::Unparseable(m)) if m.contains("syntax error")));
        // The session goes on after a caught syntax error.
        assert_eq!(Spi::get_one::<i32>("SELECT 41 + 1").unwrap(), Some(42));
    }
}
