"""Commands beside the server (`hearth bundle | doctor | models | quantize`): each has
`add_parser(subparsers)` and `run(args) -> int`. They use the engine and the appliance; nothing
imports them but the CLI."""
