//! `provider_budgets.pricing`: its keys (unknown ones are errors naming their path, as in the
//! rest of our section) and their checks, into [`Pricing`].
//!
//! Prices are USD per million tokens, a number or a decimal string (`"2.50"`), parsed exactly
//! (a YAML float is read from its shortest decimal form, `2.5`, never multiplied as a float).

use std::path::PathBuf;

use serde::Deserialize;

use crate::pricing::{CatalogSource, ModelPrices, Pricing, Rate, UnpricedPolicy};

use super::error::ConfigError;
use super::values::{Parsed, RawAmount, Text, UniqueMap};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map")]
pub(super) struct RawPricing {
    catalog: Option<Text>,
    overrides: Option<UniqueMap<RawPrices>>,
    unpriced: Option<Parsed<UnpricedPolicy>>,
    default_per_mtok: Option<RawDefault>,
}

/// One model's prices per million tokens.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a map: {input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_creation_per_mtok, reasoning_per_mtok}"
)]
struct RawPrices {
    input_per_mtok: PerMtok,
    output_per_mtok: PerMtok,
    cache_read_per_mtok: Option<PerMtok>,
    cache_creation_per_mtok: Option<PerMtok>,
    reasoning_per_mtok: Option<PerMtok>,
}

impl RawPrices {
    fn prices(&self) -> ModelPrices {
        let mut p = ModelPrices::new(self.input_per_mtok.0, self.output_per_mtok.0);
        p.cache_read = self.cache_read_per_mtok.as_ref().map(|r| r.0);
        p.cache_creation = self.cache_creation_per_mtok.as_ref().map(|r| r.0);
        p.reasoning = self.reasoning_per_mtok.as_ref().map(|r| r.0);
        p
    }
}

/// `default_per_mtok`: one price for every token kind (`"5"`), or a map like an override's.
#[derive(Debug)]
enum RawDefault {
    Flat(PerMtok),
    Prices(RawPrices),
}

impl<'de> Deserialize<'de> for RawDefault {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawDefault, D::Error> {
        use serde::de::value::MapAccessDeserializer;
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawDefault;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a price per million tokens, or a map of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<RawDefault, A::Error> {
                RawPrices::deserialize(MapAccessDeserializer::new(m)).map(RawDefault::Prices)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDefault, E> {
                per_mtok(RawAmount::Int(v)).map(RawDefault::Flat)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawDefault, E> {
                per_mtok(RawAmount::Text(Text::plain(v.to_string()))).map(RawDefault::Flat)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawDefault, E> {
                per_mtok(RawAmount::Float(v)).map(RawDefault::Flat)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDefault, E> {
                per_mtok(RawAmount::Text(Text::from_written(v)?)).map(RawDefault::Flat)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// A price in USD per million tokens, parsed exactly.
#[derive(Debug)]
struct PerMtok(Rate);

impl<'de> Deserialize<'de> for PerMtok {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PerMtok, D::Error> {
        per_mtok(RawAmount::deserialize(d)?)
    }
}

fn per_mtok<E: serde::de::Error>(amount: RawAmount) -> Result<PerMtok, E> {
    let (quoted, text) = match amount {
        RawAmount::Int(n) => (n.to_string(), n.to_string()),
        // Display of f64 is the shortest exact round trip (`2.5`), parsed as a decimal.
        RawAmount::Float(f) => (f.to_string(), f.to_string()),
        RawAmount::Text(t) => (t.quoted(), t.value),
    };
    Rate::parse_per_mtok(&text).map(PerMtok).map_err(|e| {
        E::custom(format!(
            "invalid price {quoted} (USD per million tokens): {e}"
        ))
    })
}

impl RawPricing {
    /// The checked section: `unpriced: default` needs `default_per_mtok`, which nothing else
    /// reads (given without it, it is refused rather than silently ignored).
    pub(super) fn into_pricing(self) -> Result<Pricing, ConfigError> {
        let catalog = match self.catalog {
            None => CatalogSource::Builtin,
            Some(t) if t.value.trim() == "builtin" => CatalogSource::Builtin,
            Some(t) if t.value.trim().is_empty() => {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.pricing.catalog",
                    message: "empty: give `builtin` or the path of a litellm price JSON".into(),
                })
            }
            Some(t) => CatalogSource::Path(PathBuf::from(t.value)),
        };
        let unpriced = self.unpriced.map(|u| u.0).unwrap_or_default();
        let default_per_mtok = self.default_per_mtok.map(|d| match d {
            RawDefault::Flat(r) => ModelPrices::flat(r.0),
            RawDefault::Prices(p) => p.prices(),
        });
        match (unpriced, default_per_mtok.is_some()) {
            (UnpricedPolicy::Default, false) => {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.pricing.default_per_mtok",
                    message: "missing: `unpriced: default` prices unpriced models at it".into(),
                })
            }
            (UnpricedPolicy::Deny | UnpricedPolicy::AllowZero, true) => {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.pricing.default_per_mtok",
                    message: "only used with `unpriced: default`; set that or remove it".into(),
                })
            }
            _ => {}
        }
        let overrides = self.overrides.map(|m| m.0).unwrap_or_default();
        Ok(Pricing {
            catalog,
            overrides: overrides
                .into_iter()
                .map(|(model, p)| (model, p.prices()))
                .collect(),
            unpriced,
            default_per_mtok,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{env, yaml_err};
    use crate::config::Config;
    use crate::pricing::{CatalogSource, ModelPrices, Rate, UnpricedPolicy};

    fn mtok(s: &str) -> Rate {
        Rate::parse_per_mtok(s).unwrap()
    }

    #[test]
    fn defaults_without_a_section() {
        let c = Config::from_yaml_str_with_env("provider_budgets: {}\n", env(&[])).unwrap();
        assert_eq!(c.pricing.catalog, CatalogSource::Builtin);
        assert_eq!(c.pricing.unpriced, UnpricedPolicy::Deny);
        assert!(c.pricing.overrides.is_empty());
    }

    #[test]
    fn a_full_section_parses_exactly() {
        let yaml = r#"
provider_budgets:
  pricing:
    catalog: ./prices.json
    overrides:
      gpt-4o: { input_per_mtok: "2.50", output_per_mtok: 10, cache_read_per_mtok: 1.25 }
      my-model: { input_per_mtok: os.environ/PRICE_IN, output_per_mtok: "3e-1", reasoning_per_mtok: "7" }
    unpriced: default
    default_per_mtok: "0.1"
"#;
        let c = Config::from_yaml_str_with_env(yaml, env(&[("PRICE_IN", "0.0375")])).unwrap();
        let p = &c.pricing;
        assert_eq!(p.catalog, CatalogSource::Path("./prices.json".into()));
        assert_eq!(p.unpriced, UnpricedPolicy::Default);
        assert_eq!(p.default_per_mtok, Some(ModelPrices::flat(mtok("0.1"))));
        let mut gpt = ModelPrices::new(mtok("2.5"), mtok("10"));
        gpt.cache_read = Some(mtok("1.25"));
        assert_eq!(p.overrides["gpt-4o"], gpt);
        let mine = p.overrides["my-model"];
        assert_eq!((mine.input, mine.output), (mtok("0.0375"), mtok("0.3")));
        assert_eq!(mine.reasoning, Some(mtok("7")));
        let toml = "[provider_budgets.pricing]\ncatalog = \"builtin\"\nunpriced = \"allow_zero\"\n[provider_budgets.pricing.overrides.m]\ninput_per_mtok = 1.5\noutput_per_mtok = 2\n";
        let c = Config::from_toml_str_with_env(toml, env(&[])).unwrap();
        assert_eq!(c.pricing.unpriced, UnpricedPolicy::AllowZero);
        assert_eq!(c.pricing.overrides["m"].input, mtok("1.5"));
        let map = "provider_budgets:\n  pricing: {unpriced: default, default_per_mtok: {input_per_mtok: 1, output_per_mtok: 2}}\n";
        let c = Config::from_yaml_str_with_env(map, env(&[])).unwrap();
        let d = c.pricing.default_per_mtok.unwrap();
        assert_eq!((d.input, d.output), (mtok("1"), mtok("2")));
    }

    #[test]
    fn mistakes_name_their_key() {
        for (yaml, want) in [
            (
                "provider_budgets:\n  pricing: {unpriced: maybe}\n",
                "config: provider_budgets.pricing.unpriced: invalid value \"maybe\": expected `deny`, `allow_zero` or `default`",
            ),
            (
                "provider_budgets:\n  pricing: {unpriced: default}\n",
                "config: provider_budgets.pricing.default_per_mtok: missing: `unpriced: default` prices unpriced models at it",
            ),
            (
                "provider_budgets:\n  pricing: {default_per_mtok: 1}\n",
                "config: provider_budgets.pricing.default_per_mtok: only used with `unpriced: default`; set that or remove it",
            ),
            (
                "provider_budgets:\n  pricing: {catalog: \"\"}\n",
                "config: provider_budgets.pricing.catalog: empty: give `builtin` or the path of a litellm price JSON",
            ),
            (
                "provider_budgets:\n  pricing: {overrides: {m: {input_per_mtok: abc, output_per_mtok: 1}}}\n",
                "config: provider_budgets.pricing.overrides.m.input_per_mtok: invalid price \"abc\" (USD per million tokens): \"abc\" is not a decimal number",
            ),
            (
                "provider_budgets:\n  pricing: {overrides: {m: {input_per_mtok: -1, output_per_mtok: 1}}}\n",
                "config: provider_budgets.pricing.overrides.m.input_per_mtok: invalid price \"-1\" (USD per million tokens): \"-1\" is negative",
            ),
        ] {
            let e = yaml_err(yaml);
            // Parser errors end with the place (` at line 2 column 12`).
            assert!(e.starts_with(want), "{yaml}: {e}");
        }
        for (yaml, want) in [
            ("provider_budgets:\n  pricing: {catalgo: builtin}\n", "provider_budgets.pricing"),
            ("provider_budgets:\n  pricing: {overrides: {m: {input_per_mtok: 1}}}\n", "output_per_mtok"),
            ("provider_budgets:\n  pricing: {overrides: {m: {input_per_mtok: 1, output_per_mtok: 1, output: 2}}}\n", "provider_budgets.pricing.overrides.m.output"),
            ("provider_budgets:\n  pricing: {overrides: {m: {input_per_mtok: 1, output_per_mtok: 1}, m: {input_per_mtok: 1, output_per_mtok: 1}}}\n", "given more than once"),
        ] {
            let e = yaml_err(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }
}
