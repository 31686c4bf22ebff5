"""Multi-turn agent episodes, token-exact: episodes as token arrays (`episode`), the chat template's
bridge tokens between turns (`bridge`), tool-call parsers (`tool_calls`), user environments (`environment`)
and the engine-agnostic turn step the rollout loop calls (`turns`)."""
