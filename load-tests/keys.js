// Scenario (e): njs computes the SHA-256 of the presented key for nginx's `map`.
// `js_set $key_hash keys.sha256;` in nginx-njs.conf.tmpl; njs 0.7 (Debian 12's
// libnginx-mod-http-js) has the node-style `crypto` module.
var crypto = require('crypto');

function sha256(r) {
    var key = r.headersIn['x-api-key'];
    if (!key) {
        return '';
    }
    return crypto.createHash('sha256').update(key).digest('hex');
}

// The request id as a JSON string's content, for the denials' bodies (keygate escapes
// it too). Only denials use it: nginx evaluates `js_set` variables when they are read.
function rid_json(r) {
    return JSON.stringify(r.variables.rid).slice(1, -1);
}

export default { sha256, rid_json };
