// A small JSON Schema validator for the keywords docs/bench-result.schema.json
// uses: type (name or list), enum, required, properties,
// additionalProperties: false, items, minimum, oneOf and local $ref
// ("#/$defs/NAME"). Anything else in a schema is a test failure, so the
// schema cannot silently use a keyword this validator ignores.
#pragma once

#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace rxtest {

class SchemaValidator {
public:
    explicit SchemaValidator(nlohmann::json schema) : root_(std::move(schema)) {}

    /// Errors as "path: what"; empty when `doc` is valid.
    std::vector<std::string> validate(const nlohmann::json& doc) const {
        std::vector<std::string> errors;
        check(root_, doc, "$", errors);
        return errors;
    }

private:
    static bool has_type(const nlohmann::json& v, const std::string& t) {
        if (t == "object") return v.is_object();
        if (t == "array") return v.is_array();
        if (t == "string") return v.is_string();
        if (t == "boolean") return v.is_boolean();
        if (t == "null") return v.is_null();
        if (t == "integer") return v.is_number_integer();
        if (t == "number") return v.is_number();
        return false;
    }

    void check(const nlohmann::json& s, const nlohmann::json& v, const std::string& path,
               std::vector<std::string>& errors) const {
        static const std::set<std::string> known = {
            "$schema", "$id", "title", "description", "$defs", "$ref", "oneOf", "type",
            "enum", "required", "properties", "additionalProperties", "items", "minimum"};
        for (auto& [k, _] : s.items())
            if (!known.count(k)) errors.push_back(path + ": schema keyword '" + k + "' unsupported");
        if (s.contains("$ref")) {
            std::string ref = s["$ref"];
            const std::string prefix = "#/$defs/";
            if (ref.rfind(prefix, 0) != 0) {
                errors.push_back(path + ": unsupported $ref " + ref);
                return;
            }
            return check(root_["$defs"][ref.substr(prefix.size())], v, path, errors);
        }
        if (s.contains("oneOf")) {
            int matches = 0;
            for (auto& alt : s["oneOf"]) {
                std::vector<std::string> sub;
                check(alt, v, path, sub);
                if (sub.empty()) ++matches;
            }
            if (matches != 1)
                errors.push_back(path + ": matches " + std::to_string(matches) + " of oneOf");
            return;
        }
        if (s.contains("type")) {
            bool ok = false;
            if (s["type"].is_array()) {
                for (auto& t : s["type"]) ok = ok || has_type(v, t);
            } else {
                ok = has_type(v, s["type"]);
            }
            if (!ok) {
                errors.push_back(path + ": expected type " + s["type"].dump() + ", got " + v.dump());
                return;
            }
        }
        if (s.contains("enum")) {
            bool ok = false;
            for (auto& e : s["enum"]) ok = ok || e == v;
            if (!ok) errors.push_back(path + ": " + v.dump() + " not in " + s["enum"].dump());
        }
        if (s.contains("minimum") && v.is_number() && v.get<double>() < s["minimum"].get<double>())
            errors.push_back(path + ": " + v.dump() + " below minimum " + s["minimum"].dump());
        if (v.is_object()) {
            if (s.contains("required"))
                for (auto& r : s["required"])
                    if (!v.contains(r.get<std::string>()))
                        errors.push_back(path + ": missing required key " + r.dump());
            const auto props = s.value("properties", nlohmann::json::object());
            for (auto& [k, sub] : v.items()) {
                if (props.contains(k))
                    check(props[k], sub, path + "." + k, errors);
                else if (s.contains("additionalProperties") && s["additionalProperties"] == false)
                    errors.push_back(path + ": unexpected key '" + k + "'");
            }
        }
        if (v.is_array() && s.contains("items"))
            for (std::size_t i = 0; i < v.size(); ++i)
                check(s["items"], v[i], path + "[" + std::to_string(i) + "]", errors);
    }

    nlohmann::json root_;
};

}  // namespace rxtest
