"""Real processes on free loopback ports: tritonserver on our model repository, the OpenAI frontend and
moto's S3 server."""
