//! A result set from `copilot.run_sql`: its rows arrive as JSON objects (one per row); the columns keep the order
//! of the objects' keys as the server wrote them.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// A JSON object's entries in the order written (serde_json's own map sorts them).
struct Ordered(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl ResultSet {
    /// From the text of each row's JSON object. Columns are the first row's keys, then any key a later row adds.
    pub fn from_json_rows<'a>(rows: impl IntoIterator<Item = &'a str>) -> Result<ResultSet, String> {
        let mut parsed = Vec::new();
        let mut columns: Vec<String> = Vec::new();
        for text in rows {
            let Ordered(entries) =
                serde_json::from_str(text).map_err(|e| format!("a row was not a JSON object: {e}"))?;
            for (k, _) in &entries {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
            parsed.push(entries);
        }
        let rows = parsed
            .into_iter()
            .map(|entries| {
                columns
                    .iter()
                    .map(|c| entries.iter().find(|(k, _)| k == c).map(|(_, v)| v.clone()).unwrap_or(Value::Null))
                    .collect()
            })
            .collect();
        Ok(ResultSet { columns, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_key_order_and_fills_missing() {
        let r = ResultSet::from_json_rows([r#"{"z": 1, "a": "x"}"#, r#"{"z": 2, "a": null, "b": true}"#]).unwrap();
        assert_eq!(r.columns, ["z", "a", "b"]);
        assert_eq!(r.rows[0], vec![Value::from(1), Value::from("x"), Value::Null]);
        assert_eq!(r.rows[1], vec![Value::from(2), Value::Null, Value::from(true)]);
    }

    #[test]
    fn refuses_non_objects() {
        assert!(ResultSet::from_json_rows(["[1,2]"]).is_err());
        assert!(ResultSet::from_json_rows(["{"]).is_err());
    }
}
