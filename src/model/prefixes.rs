//! The built-in table of bare model-name prefixes (`gpt-4o` → `openai`): the third step of
//! provider resolution (see `resolve`), and what `model_providers` in the config may not shadow.

/// Bare model-name prefixes and their provider, checked in order.
pub const BUILTIN_PREFIXES: &[(&str, &str)] = &[
    ("gpt-", "openai"),
    ("chatgpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("text-embedding-", "openai"),
    ("dall-e", "openai"),
    ("whisper-", "openai"),
    ("tts-", "openai"),
    ("davinci", "openai"),
    ("babbage", "openai"),
    ("claude-", "anthropic"),
    ("gemini-", "gemini"),
    ("command-", "cohere"),
    ("mistral-", "mistral"),
    ("mixtral-", "mistral"),
    ("codestral-", "mistral"),
    ("open-mistral-", "mistral"),
    ("deepseek-", "deepseek"),
    ("grok-", "xai"),
];
