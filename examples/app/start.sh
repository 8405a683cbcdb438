# Writes the page from the image's VERSION and the GREETING environment variable (a key of the
# Kubernetes Secret the Project lists in secretRefs), then serves /www on port 8080. Only shell
# builtins and busybox itself: the image has nothing else.
read -r version </app/VERSION
printf '<!doctype html>\n<title>Stagely demo</title>\n<h1>Hello from the Stagely demo app</h1>\n<p>version: <b>%s</b></p>\n<p>GREETING: <b>%s</b></p>\n' \
  "$version" "${GREETING:-(not set)}" >/www/index.html
exec /bin/busybox httpd -f -p 8080 -h /www
