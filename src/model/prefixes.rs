//! The built-in table of bare model-name prefixes (`gpt-4o` → `openai`): the third step of
//! provider resolution (see `resolve`), and what `model_providers` in the config may not shadow.

/// Provider names litellm uses (the part before `/` in `openai/gpt-4o`), beside those of
/// [`BUILTIN_PREFIXES`]: a budget named like one of them but in another case (`OpenAI`) is
/// warned about (provider names are case-sensitive, so it would apply to nothing).
pub const KNOWN_PROVIDERS: &[&str] = &[
    "openai",
    "anthropic",
    "azure",
    "azure_ai",
    "bedrock",
    "vertex_ai",
    "gemini",
    "cohere",
    "mistral",
    "deepseek",
    "xai",
    "groq",
    "together_ai",
    "openrouter",
    "fireworks_ai",
    "perplexity",
    "ollama",
    "huggingface",
    "replicate",
    "sagemaker",
    "watsonx",
    "databricks",
    "cloudflare",
    "deepinfra",
    "ai21",
    "voyage",
    "cerebras",
    "sambanova",
    "nvidia_nim",
];

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
