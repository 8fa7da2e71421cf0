// Package names holds the one rule every name in pagedkv follows: a model registered with a
// SharedPool, a member of a ledger or a vmm.Budget, an object of a metrics collector. A name is
// 1 to Max bytes of valid UTF-8 with no control character (NUL included), so that it fits a
// ledger slot, prints as itself in pagedkvctl and is a valid Prometheus label value.
package names

import (
	"fmt"
	"unicode"
	"unicode/utf8"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// Max is the longest name, in bytes: what a ledger slot holds.
const Max = 63

// Check returns nil when name follows the rule, else a *errdefs.NameError that says why; what
// says whose name it is ("model", "member").
func Check(what, name string) error {
	reason := ""
	switch {
	case name == "":
		reason = "is empty"
	case len(name) > Max:
		reason = fmt.Sprintf("is longer than %d bytes", Max)
	case !utf8.ValidString(name):
		reason = "is not valid UTF-8"
	default:
		for i, r := range name {
			if unicode.IsControl(r) {
				reason = fmt.Sprintf("has a control character (%U) at byte %d", r, i)
				break
			}
		}
	}
	if reason == "" {
		return nil
	}
	return &errdefs.NameError{What: what, Name: name, Reason: reason}
}
