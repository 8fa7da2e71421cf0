// Package snippets holds a test that every Go snippet of README.md and docs/*.md compiles
// against the module's current API. It has no code of its own.
package snippets
