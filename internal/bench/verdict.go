package bench

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/loadgen"
)

// Verdict fails a run in which nothing succeeded, or in which more than
// maxErrors percent of the requests failed other than by shedding (a 503
// unavailable: the vault protecting its HSMs under overload). The error
// says what failed and, for each limit that refused (limiters, as Run
// returns them), what to change; its advice names keyvault bench's flags.
func Verdict(res loadgen.Result, maxErrors float64, limiters map[string]int64) error {
	var failed int64 // other than by shedding
	for code, n := range res.Errors {
		if code != client.CodeUnavailable {
			failed += n
		}
	}
	share := 0.0
	if res.Requests > 0 {
		share = 100 * float64(failed) / float64(res.Requests)
	}
	var head string
	switch {
	case res.Requests == 0:
		return errors.New("no request was answered in the window: lengthen --duration")
	case res.Succeeded == 0 && failed == 0:
		head = fmt.Sprintf("nothing succeeded: every request was shed (%d unavailable, 503): the HSMs are saturated or down; lower --concurrency or --rate, or check /readyz", res.Requests)
	case res.Succeeded == 0 && res.Errors[client.CodeRateLimited] == res.Requests:
		head = fmt.Sprintf("nothing succeeded: every request was refused rate_limited (%d)", res.Requests)
	case res.Succeeded == 0:
		head = fmt.Sprintf("nothing succeeded: %d requests, errors %s", res.Requests, errorCounts(res.Errors))
	case share > maxErrors:
		head = fmt.Sprintf("%d of %d requests (%.1f%%) failed other than by shedding, above --max-errors %g%%: %s",
			failed, res.Requests, share, maxErrors, errorCounts(res.Errors))
	default:
		return nil
	}
	lines := []string{head}
	if n := res.Errors[client.CodeRateLimited]; n > 0 {
		names := slices.Sorted(maps.Keys(limiters))
		var by []string
		for _, l := range names {
			name := l
			if name == "" {
				name = "a limit the answer did not name"
			}
			by = append(by, fmt.Sprintf("%s %d", name, limiters[l]))
		}
		lines = append(lines, fmt.Sprintf("rate_limited (429) by: %s", strings.Join(by, ", ")))
		for _, l := range names {
			lines = append(lines, limitHint(l))
		}
	}
	for _, code := range slices.Sorted(maps.Keys(res.Errors)) {
		if code == client.CodeRateLimited || code == client.CodeUnavailable {
			continue
		}
		if text := res.FirstErrors[code]; text != "" {
			lines = append(lines, fmt.Sprintf("the first %s: %s", code, text))
		}
	}
	return errors.New(strings.Join(lines, "\n  "))
}

// limitHint says what to do about a limit that refused the bench's load.
func limitHint(limiter string) string {
	switch limiter {
	case "guesses_per_user":
		return "ratelimit.guesses_per_user allows each user a few guesses a minute: for a bench, raise it in the vault's config, or spread the load over more users with --users N"
	case "requests_per_client":
		return "ratelimit.requests_per_client caps the bench's client: for a bench, raise it in the vault's config, or send less with --rate R"
	case "wrong_guesses_per_client":
		return "ratelimit.wrong_guesses_per_client caps the wrong guesses of the bench's client: for a bench, raise it in the vault's config, or send fewer (--rate R, --op recover)"
	case "escalating_delay":
		return fmt.Sprintf("budget.escalating_delay holds back a user's wrong guesses in a row, and the bench sends up to %d in a row: for a bench, raise its free_guesses above %d or set its base to 0s", escalatingFree, escalatingFree)
	default:
		return "the vault's per-user and per-client limits apply to the bench as to any client: for a bench, raise ratelimit.* in the vault's config, or spread the load with --users N and --rate R"
	}
}

// errorCounts lists error counts by code, sorted: "a=1, b=2".
func errorCounts(errs map[string]int64) string {
	var parts []string
	for _, c := range slices.Sorted(maps.Keys(errs)) {
		parts = append(parts, fmt.Sprintf("%s=%d", c, errs[c]))
	}
	return strings.Join(parts, ", ")
}
