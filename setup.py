"""Packaging for sidclip-guide: everything is read from `settings.ini` (nbdev 2 layout)."""
from packaging.version import parse as parse_version
from configparser import ConfigParser
import setuptools, shlex

assert parse_version(setuptools.__version__) >= parse_version('36.2')

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

expected = 'version description keywords author author_email'.split()
missing = [o for o in expected if o not in cfg]
if missing: raise ValueError(f"settings.ini is missing {missing}")

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.9 3.10 3.11 3.12 3.13'.split()

requirements = shlex.split(cfg.get('requirements', ''))
deploy_requirements = shlex.split(cfg.get('deploy_requirements', ''))   # `sidclip export` / `sidclip predict`
lite_requirements = shlex.split(cfg.get('lite_requirements', ''))       # the ImageNet weights of `sidclip run imagefolder lite-cpu`
dev_requirements = shlex.split(cfg.get('dev_requirements', '')) + deploy_requirements + lite_requirements
lic = licenses[cfg['license'].lower()]
min_python = cfg['min_python']
console_scripts = cfg.get('console_scripts', '').split()

setuptools.setup(
    name=cfg['repo'],
    license=lic[0],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'License :: ' + lic[1],
                 'Natural Language :: ' + cfg['language'].title()]
                + ['Programming Language :: Python :: ' + o for o in py_versions[py_versions.index(min_python):]],
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=[cfg['lib_name'], cfg['lib_name'] + '.*']),
    include_package_data=True,
    install_requires=requirements,
    extras_require={'dev': dev_requirements, 'deploy': deploy_requirements, 'export': deploy_requirements, 'lite': lite_requirements},
    python_requires='>=' + cfg['min_python'],
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': console_scripts, 'nbdev': [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]},
    version=cfg['version'], description=cfg['description'], keywords=cfg['keywords'],
    author=cfg['author'], author_email=cfg['author_email'],
)
