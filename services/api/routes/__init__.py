"""Route handlers, thin: parse, call one gateway or store function, map the result."""
