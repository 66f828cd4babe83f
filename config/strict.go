package config

import (
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// The structure check walks the YAML node tree against the yaml tags of
// Config before anything is decoded. yaml.v3's own KnownFields mode stops at
// the first unknown key and does not say where it is nested; this walk
// reports every unknown key, duplicate key and wrongly typed value with its
// full key path, and prunes each of them from the tree, so that what is
// left decodes and can be validated in the same pass. It knows the few Go
// types Config is made of; adding a field of a new kind means adding a case
// to walk (a test parses a full config, so a missing case panics there, not
// in production).

// inlinePINKeys are keys under which someone might write the PIN itself into
// a member. They get a message that says what to do instead.
var inlinePINKeys = map[string]bool{
	"pin": true, "pin_value": true, "password": true, "passwd": true,
	"user_pin": true, "passphrase": true, "secret": true,
}

// movedKeys maps a key path that configs of earlier releases used to the
// key path that takes the same fields now, so that the message says where
// to write it instead of "unknown key".
var movedKeys = map[string]string{
	"ratelimit.escalating_delay": "budget.escalating_delay",
}

var (
	stringListType = reflect.TypeFor[StringList]()
	durationType   = reflect.TypeFor[time.Duration]()
	memberType     = reflect.TypeFor[Member]()
)

type structureChecker struct {
	errs []error
	// paths are the key paths of the values pruned for their type, so that
	// validation does not report them again ("required").
	paths []string
	// done records the (node, type) pairs already walked. An anchored node
	// reached again through aliases is checked once, which keeps the walk
	// linear however the aliases nest, and reports its problems once, under
	// the path where it was first met.
	done map[visit]bool
}

type visit struct {
	n *yaml.Node
	t reflect.Type
}

// checkStructure checks the top-level mapping root against Config, prunes
// every key and list item it reports from the tree, and returns the
// problems and their key paths.
func checkStructure(root *yaml.Node) (problems []error, paths []string) {
	c := &structureChecker{done: map[visit]bool{}}
	c.walk(root, reflect.TypeFor[Config](), "")
	return c.errs, c.paths
}

func (c *structureChecker) add(path string, line int, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if line > 0 {
		msg += fmt.Sprintf(" (line %d)", line)
	}
	c.errs = append(c.errs, &problem{path: path, msg: msg})
	c.paths = append(c.paths, path)
}

// addKey reports a key that is itself wrong (unknown, duplicate, an inline
// PIN). Its path is not recorded as pruned: the field it names, if any,
// keeps its first or default value, which validation still checks.
func (c *structureChecker) addKey(path string, line int, format string, args ...any) {
	c.add(path, line, format, args...)
	c.paths = c.paths[:len(c.paths)-1]
}

// walk checks that n has the shape of Go type t. It reports false when n
// itself has the wrong shape, and the caller then prunes n; problems deeper
// in n are pruned there. Callers skip null values in mappings (an absent or
// empty value keeps the default), so a null that reaches walk is a list item
// left empty, and is an error.
func (c *structureChecker) walk(n *yaml.Node, t reflect.Type, path string) bool {
	n = resolveAlias(n)
	if n == nil {
		return true
	}
	v := visit{n, t}
	if c.done[v] {
		return true // reported and pruned where it was first met
	}
	c.done[v] = true

	if n.Kind == yaml.ScalarNode && !strings.HasPrefix(n.ShortTag(), "!!") {
		// A custom tag (!env, !include, ...) would be silently ignored by
		// the decoder; say so instead.
		c.add(path, n.Line, "unsupported YAML tag %s", n.ShortTag())
		return false
	}
	if t == stringListType {
		return c.stringList(n, path)
	}
	if t == durationType {
		_, err := time.ParseDuration(n.Value)
		return c.scalar(n, path, `a duration (like "50ms" or "1m")`, n.Kind == yaml.ScalarNode && n.ShortTag() == "!!str" && err == nil)
	}
	switch t.Kind() {
	case reflect.Pointer:
		return c.walk(n, t.Elem(), path)
	case reflect.Struct:
		return c.mapping(n, t, path, func(key string) (reflect.Type, bool) {
			return structField(t, key)
		})
	case reflect.Map:
		if t.Key().Kind() != reflect.String {
			panic(fmt.Sprintf("config: structure check: map key type %s", t.Key()))
		}
		return c.mapping(n, t, path, func(string) (reflect.Type, bool) {
			return t.Elem(), true
		})
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			c.add(path, n.Line, "expected a list, got %s", describe(n))
			return false
		}
		c.sequence(n, path, t.Elem())
		return true
	case reflect.String:
		return c.scalar(n, path, "a string", n.Kind == yaml.ScalarNode && isStringTag(n.ShortTag()))
	case reflect.Int:
		if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!int" {
			var x int
			if err := n.Decode(&x); err != nil {
				c.add(path, n.Line, "integer out of range")
				return false
			}
			return true
		}
		return c.scalar(n, path, "an integer", false)
	case reflect.Bool:
		return c.scalar(n, path, "a boolean (true or false)", n.Kind == yaml.ScalarNode && n.ShortTag() == "!!bool")
	default:
		panic(fmt.Sprintf("config: structure check: no case for %s at %s", t, path))
	}
}

// sequence walks the items of n as elem and prunes the ill-shaped ones.
func (c *structureChecker) sequence(n *yaml.Node, path string, elem reflect.Type) {
	kept := n.Content[:0:0]
	for i, item := range n.Content {
		if c.walk(item, elem, indexKey(path, i)) {
			kept = append(kept, item)
		}
	}
	n.Content = kept
}

func (c *structureChecker) scalar(n *yaml.Node, path, want string, ok bool) bool {
	if !ok {
		c.add(path, n.Line, "expected %s, got %s", want, describe(n))
	}
	return ok
}

// isStringTag reports whether a scalar with this tag may fill a string
// field. yaml.v3 stores the text as written for all of these, so "1234" and
// "true" are fine as names and labels; !!binary would be base64-decoded
// behind the reader's back.
func isStringTag(tag string) bool {
	switch tag {
	case "!!str", "!!int", "!!float", "!!bool", "!!timestamp":
		return true
	}
	return false
}

func (c *structureChecker) stringList(n *yaml.Node, path string) bool {
	switch n.Kind {
	case yaml.ScalarNode:
		return c.walk(n, reflect.TypeFor[string](), path)
	case yaml.SequenceNode:
		c.sequence(n, path, reflect.TypeFor[string]())
		return true
	default:
		c.add(path, n.Line, "expected a string or a list of strings, got %s", describe(n))
		return false
	}
}

// mapping checks a mapping node whose keys are looked up with field (a
// struct's yaml tags, or any key for a map). t is the Go type, used for
// merge keys and for the member-specific PIN message.
func (c *structureChecker) mapping(n *yaml.Node, t reflect.Type, path string, field func(string) (reflect.Type, bool)) bool {
	if n.Kind != yaml.MappingNode {
		c.add(path, n.Line, "expected a mapping, got %s", describe(n))
		return false
	}
	seen := map[string]int{} // key -> line of its first occurrence
	kept := n.Content[:0:0]
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := resolveAlias(n.Content[i]), n.Content[i+1]
		if c.entry(k, val, t, path, field, seen) {
			kept = append(kept, n.Content[i], val)
		}
	}
	n.Content = kept
	return true
}

// entry checks one key and its value in a mapping, and reports whether the
// entry is kept.
func (c *structureChecker) entry(k, val *yaml.Node, t reflect.Type, path string, field func(string) (reflect.Type, bool), seen map[string]int) bool {
	if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
		return c.merge(val, t, path)
	}
	if k.Kind != yaml.ScalarNode || k.ShortTag() == "!!null" {
		c.add(path, k.Line, "keys must be strings, got %s", describe(k))
		return false
	}
	name := k.Value
	kp := fieldKey(path, name)
	if first, dup := seen[name]; dup {
		c.addKey(kp, k.Line, "duplicate key (first at line %d)", first)
		return false
	}
	seen[name] = k.Line
	ft, ok := field(name)
	switch {
	case !ok && t == memberType && inlinePINKeys[strings.ToLower(name)]:
		c.addKey(kp, k.Line, "the HSM PIN must not be inline; use pin_env or pin_file")
		return false
	case !ok && movedKeys[kp] != "":
		c.addKey(kp, k.Line, "moved to %s, with the same fields", movedKeys[kp])
		return false
	case !ok:
		c.addKey(kp, k.Line, "unknown key")
		return false
	case isNull(val):
		return true // an absent value: the field keeps its default
	default:
		return c.walk(val, ft, kp)
	}
}

// merge checks the value of a YAML merge key ("<<: *base"), which yaml.v3
// decodes as if the merged mapping's keys were written in place.
func (c *structureChecker) merge(val *yaml.Node, t reflect.Type, path string) bool {
	val = resolveAlias(val)
	switch val.Kind {
	case yaml.MappingNode:
		return c.walk(val, t, path)
	case yaml.SequenceNode:
		kept := val.Content[:0:0]
		for _, item := range val.Content {
			if r := resolveAlias(item); r.Kind != yaml.MappingNode {
				c.add(fieldKey(path, "<<"), r.Line, "merge needs a mapping, got %s", describe(r))
				continue
			}
			c.walk(item, t, path)
			kept = append(kept, item)
		}
		val.Content = kept
		return true
	default:
		c.add(fieldKey(path, "<<"), val.Line, "merge needs a mapping or a list of mappings, got %s", describe(val))
		return false
	}
}

// structField returns the type of the field of struct t whose yaml key is
// key.
func structField(t reflect.Type, key string) (reflect.Type, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name) // yaml.v3's default key
		}
		if name == key {
			return f.Type, true
		}
	}
	return nil, false
}

// resolveAlias follows an alias to the node it names.
func resolveAlias(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	n = resolveAlias(n)
	return n == nil || (n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null")
}

// describe names the kind of value n holds, for "expected X, got Y". It
// never includes the value itself, which could be a secret.
func describe(n *yaml.Node) string {
	n = resolveAlias(n)
	if n == nil {
		return "nothing"
	}
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.DocumentNode:
		return "a document"
	case yaml.ScalarNode:
		switch tag := n.ShortTag(); tag {
		case "!!null":
			return "no value"
		case "!!str":
			return "a string"
		case "!!int":
			return "an integer"
		case "!!float":
			return "a number that is not an integer"
		case "!!bool":
			return "a boolean"
		case "!!timestamp":
			return "a timestamp"
		default:
			return "a value tagged " + tag
		}
	}
	return "an unexpected YAML node"
}

var plainKey = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// fieldKey appends key to path. A key that is not a plain word is quoted and
// shortened, so a stray line break or a pasted blob cannot garble the
// message.
func fieldKey(path, key string) string {
	if !plainKey.MatchString(key) {
		if len(key) > 64 {
			key = key[:64] + "..."
		}
		key = strconv.Quote(key)
	}
	if path == "" {
		return key
	}
	return path + "." + key
}

func indexKey(path string, i int) string {
	return fmt.Sprintf("%s[%d]", path, i)
}
