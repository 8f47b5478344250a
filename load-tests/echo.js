// The upstream's echo mode (nginx-upstream.conf.tmpl): a request with `x-echo: 1` is
// answered with what the upstream received, as JSON, so that compare.py can check that
// keygate and its peers send the upstream the same request.
function headers(r) {
    var out = {
        method: r.method,
        target: r.variables.request_uri,
        version: r.httpVersion,
        headers: r.rawHeadersIn,
    };
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, JSON.stringify(out));
}

export default { headers };
