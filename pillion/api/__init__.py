"""API adapters: decode a transport's request, await a block, encode the answer."""
