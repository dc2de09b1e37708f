"""One package per deployable service. Services never import each other (import-linter checks)."""
